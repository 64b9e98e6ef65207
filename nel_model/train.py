"""``python -m nel_model.train`` (``dim-mel train``): train and evaluate DIM on a feature cache.

The entry point keeps the name DIM's own code uses; the training loop is :mod:`nel_model.training.loop`, its flags
:mod:`nel_model.args`.
"""

from data_process.core.entry import run_main
from nel_model.training.loop import command

if __name__ == "__main__":
    run_main(command)
