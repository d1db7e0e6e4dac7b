"""Train one language model, or sweep many with -m.

python train.py                                   # GPT on characters of Tiny Shakespeare
python train.py model=lstm tokenizer=bpe          # any model x tokenizer
python train.py -m model=rnn,gru,lstm,transformer,gpt tokenizer=char,word,bpe
python train.py ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt   # resume a run where it stopped
python train.py init_from=<ckpt> data=text data.path=my.txt         # fine-tune a trained model on new text
"""

import hydra
from omegaconf import DictConfig

from lmlab.cli import register_resolvers, user_errors
from lmlab.run.train import run_job

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors
def main(cfg: DictConfig) -> float:
    return run_job(cfg)


if __name__ == "__main__":
    main()
