"""Training under Accelerate: DDP, FSDP, DeepSpeed ZeRO-2/3; checkpoints with exact resume."""

from qa_dist.runtime.preemption import EXIT_PREEMPTED
from qa_dist.train.loop import Evaluator, NullEvaluator, PeriodicEvaluator, TrainResult, train

__all__ = ["EXIT_PREEMPTED", "Evaluator", "NullEvaluator", "PeriodicEvaluator", "TrainResult", "train"]
