"""Sample text from a trained model.

python generate.py ckpt=outputs/runs/<run>/checkpoints/last.ckpt prompt="ROMEO:"
python generate.py ckpt=... temperature=0                  # greedy
python generate.py ckpt=... top_p=0.9 num_samples=3 seed=7  # nucleus sampling, three samples
python generate.py ckpt=... num_beams=4                     # beam search
python generate.py ckpt=... verify_checkpoint_hash=false     # a very large checkpoint: skip re-hashing its tensors
"""

import hydra
from omegaconf import DictConfig

from lmlab.cli import register_resolvers, user_errors
from lmlab.generate import generate_from_config

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@user_errors
def main(cfg: DictConfig) -> None:
    generate_from_config(cfg)


if __name__ == "__main__":
    main()
