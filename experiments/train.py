"""Train a grassq model from a config file.

  python -m experiments.train --config experiments/configs/fmnist_resnet20.py --workdir runs/x
  python -m experiments.train --config experiments/configs/default.py --config.num_epochs=2

Any config field can be overridden with --config.FIELD=VALUE. Re-running with the same workdir
resumes from its latest checkpoint (a finished run only re-evaluates).
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Experiment config file.")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics). Default: runs/<config>.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  import os

  from grassq import train

  config = FLAGS.config
  workdir = FLAGS.workdir
  if workdir is None:
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
    workdir = os.path.join("runs", name)
  result = train.train_and_evaluate(config, workdir)
  print(f"model {config.model}/{config.head} on {config.dataset}: step {result['step']}, "
        f"test accuracy {result.get('test_accuracy', float('nan')):.4f}")
  print(f"checkpoint: {os.path.join(workdir, 'checkpoints')}  metrics: "
        f"{os.path.join(workdir, 'metrics.jsonl')}")


if __name__ == "__main__":
  app.run(main)
