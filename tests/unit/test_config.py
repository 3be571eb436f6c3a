"""The typed config tree: YAML, dotted overrides, strict keys and types, resolved copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qa_dist import ConfigError, RunConfig, load_config
from qa_dist.config import resolved_config_record, valid_keys

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "runs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_run_config_in_configs_loads(path):
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())

    # Every key written in the file reached the config (nothing silently dropped).
    def check(node, values, where):
        for key, value in values.items():
            got = getattr(node, key)
            if isinstance(value, dict):
                check(got, value, f"{where}{key}.")
            else:
                assert got == value or got == float(value), where + key

    check(config, raw, "")


def test_overrides_and_yaml_scalars(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  max_length: 256\ntrain:\n  lr: 1.0e-4\n")
    config = load_config(
        path,
        [
            "train.lr=3e-5",
            "data.doc_stride=64",
            "data.eval=null",
            "model.name_or_path=roberta-large",
            "train.epochs=3",
            "data.strict=true",
        ],
    )
    assert config.train.lr == pytest.approx(3e-5)  # PyYAML reads "3e-5" as a string; floats accept it
    assert config.data.max_length == 256 and config.data.doc_stride == 64
    assert config.data.eval is None and config.data.strict is True
    assert config.train.epochs == 3.0 and isinstance(config.train.epochs, float)
    assert config.model.name_or_path == "roberta-large"
    with pytest.raises(AttributeError):
        config.train.lr = 1.0  # frozen


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.learning_rate=1e-5"],
            r"unknown config key 'train.learning_rate'; did you mean 'train.lr'\? \(keys of train: lr, epochs,",
        ),
        (
            ["dat.max_length=3"],
            r"unknown config key 'dat'; did you mean 'data'\? \(sections and keys: run_dir, resume, data, model",
        ),
        (["data.max_length=long"], r"data.max_length: expected int, got 'long'"),
        (["data.max_length=3.5"], r"data.max_length: expected int"),
        (["data.strict=maybe"], r"data.strict: expected bool"),
        (
            ["train.mixed_precision=fp8"],
            r"train.mixed_precision: 'fp8' is not one of 'no', 'fp16', 'bf16'",
        ),
        (["max_length"], r"not of the form key=value"),
        (["data=3"], r"data: expected a mapping"),
    ],
)
def test_bad_keys_and_types_list_the_valid_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  max_length: 3\n   doc_stride: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: malformed YAML at line 3"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: a run config is a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["data.train=sample:en-train", "train.lr=2e-5", f"run_dir={tmp_path / 'run'}"])
    written, text = resolved_config_record(config)
    assert written == tmp_path / "run" / "config.yaml"
    written.parent.mkdir(parents=True)
    written.write_text(text)
    assert load_config(written) == config
    assert set(valid_keys()) >= {
        "data.max_length",
        "data.doc_stride",
        "train.lr",
        "launch.strategy",
        "logging.wandb_project",
    }
    assert RunConfig().data.max_length == 384 and RunConfig().data.doc_stride == 128


def test_every_field_has_a_docstring():
    """One line of documentation per field, as the config tree promises."""
    import ast
    import inspect

    import qa_dist.config as module

    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    following = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring"
                    )


def test_config_keys_and_help_do_not_import_torch():
    # Every command used to pay about 2 s for torch, transformers and numba before parsing its flags.
    import subprocess
    import sys

    probe = (
        "import sys, contextlib, io\n"
        "from qa_dist.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['config', '--keys'])\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numba', 'pyarrow'))\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout[:500]


def test_text_keys_keep_the_text_an_override_gave(tmp_path):
    """YAML reads 012345 as octal 5349 and 24:00:00 as 86400: a text field takes what was typed."""
    config = load_config(None, ["launch.account=012345", "launch.time=24:00:00", "launch.time=90", "train.seed=0x10"])
    assert (config.launch.account, config.launch.time, config.train.seed) == ("012345", "90", 16)
    path = tmp_path / "run.yaml"
    path.write_text("launch:\n  time: 24:00:00\n")  # in a file: refused, quoting asked for
    with pytest.raises(ConfigError, match=r"launch.time: 86400 was read as a number; write it quoted"):
        load_config(path)
