"""Train one language model, or sweep many with -m:

python train.py                                   # GPT on characters of Tiny Shakespeare
python train.py model=lstm tokenizer=bpe          # any model x tokenizer
python train.py -m model=rnn,gru,lstm,transformer,gpt tokenizer=char,word,bpe
python train.py ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt   # resume a run where it stopped
python train.py init_from=<ckpt> data=text data.path=my.txt         # fine-tune a trained model on new text
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import lmlab.config
import lmlab.resume  # noqa: F401  (registers lmlab_run_dir, which hydra.run.dir uses to resume in place)
from lmlab.errors import LmlabError, RunInterrupted

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from lmlab.train import record_failure, train

    # In a sweep, a failed job is recorded in its metrics.json and the sweep goes on to the next one.
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return train(cfg)["val/bpb"]
    except LmlabError as err:
        print(f"error: {err}", file=sys.stderr)
        if not sweeping:
            sys.exit(2)
        record_failure(cfg, err)
        if isinstance(err, RunInterrupted):
            sys.exit(130)  # Ctrl-C or SIGTERM stops the whole sweep, not only this job
    except Exception as err:
        if not sweeping:
            raise
        log.exception("this job crashed; the sweep goes on")  # the traceback, in the job's log file
        record_failure(cfg, err)
    return float("inf")  # the worst val/bpb: an Optuna search steers away from settings that fail


if __name__ == "__main__":
    main()
