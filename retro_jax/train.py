r"""Train RETRO (or its retrieval-free baseline, or RETRO-fit a baseline).

  retro-train --config=quickstart --workdir=runs/retro \
      --config.data.db_dir=DB --config.data.neighbors_dir=NEIGHBORS \
      [--config.model.num_layers=4 --config.retrieval=False ...]

(`python -m retro_jax.train` is the same command.)  --config is a packaged config's name
(quickstart, quickstart_baseline, small, small_baseline, tiny, retro_172m, ...: see
retro_jax/configs/) or a path to your own config file.

Every field of the config file can be overridden with --config.FIELD=VALUE (see
retro_jax/training/train_config.py for the list).  Re-running the same command with the same
--workdir resumes from the latest checkpoint, data position included.  Multi-host:
--config.distributed=True calls jax.distributed.initialize() (arguments auto-detected on
TPU/SLURM/..., or given with --coordinator_address/--num_processes/--process_id).
A bad flag, config value or input ends in one line, `train: error: ...` (see _cli.run).
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from retro_jax import _cli
from retro_jax import configs
from retro_jax import remote

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard events.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-host; else auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_SKIP_CONTENT_CHECK = flags.DEFINE_bool(
    "skip_content_check", False, "Do not recompute the recorded sha256 of the chunk store and "
    "neighbors arrays, nor the resumed checkpoint's fingerprint, at start (seconds per GB; "
    "skip only for files `python -m retro_jax.verify` has just checked).")
flags.mark_flags_as_required(["config", "workdir"])

# trainer.USER_ERRORS beyond ValueError and OSError, which _cli.run reports anyway.
_ERRORS = ["retro_jax.training.trainer.TrainingDiverged",
           "retro_jax.training.checkpoint.CheckpointError"]


def main(argv):
  del argv
  from retro_jax.training import trainer  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  cfg = _CONFIG.value
  for key in ("db_dir", "train_chunks_dir", "neighbors_dir", "eval_chunks_dir",
              "eval_neighbors_dir"):  # URLs staged to local disk (retro_jax/remote.py)
    if remote.is_url(cfg.data[key]):
      cfg.data[key] = remote.stage_in(cfg.data[key])
  if remote.is_url(cfg.retrofit.checkpoint):
    cfg.retrofit.checkpoint = remote.stage_in(cfg.retrofit.checkpoint)
  summary = trainer.run(cfg, _WORKDIR.value, coordinator_address=_COORDINATOR.value,
                        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                        check_contents=not _SKIP_CONTENT_CHECK.value)
  logging.info("finished at step %d%s", summary["step"],
               " (preempted: checkpoint saved)" if summary["preempted"] else "")


if __name__ == "__main__":
  _cli.run(main, "train", errors=_ERRORS, rewrite_argv=configs.rewrite_argv,
           outputs=("workdir",))
