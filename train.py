"""Train one language model, or sweep many with -m:

    python train.py                                   # GPT on characters of Tiny Shakespeare
    python train.py model=lstm tokenizer=bpe          # any model x tokenizer
    python train.py -m model=rnn,gru,lstm,transformer,gpt tokenizer=char,word,bpe
"""

import sys

import hydra
from omegaconf import DictConfig

import lmlab.config  # noqa: F401  (registers the config resolvers before Hydra composes)
from lmlab.errors import LmlabError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from lmlab.train import train

    try:
        return train(cfg)["val/bpb"]
    except LmlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
