"""What every stage runs on: the process group (``dist``), preemption signals, rank zero's output
(``report``) and atomic file writes (``fsutil``). Nothing here imports a stage above it."""
