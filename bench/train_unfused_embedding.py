"""``bft_megatron.train`` with the word embedding's fused weight gradient switched off: the embedding
writes its bf16 gradient and DDP's hook adds it to ``main_grad``, as before bft_megatron.model.wgrad had the
embedding path. The A/B baseline of ``bench/train_bench.py --suite 8b-emb`` (not a user option).

    python bench/train_unfused_embedding.py --config configs/bench/llama8b_proxy.yaml [overrides ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bft_megatron.model import builder  # noqa: E402
from bft_megatron.train import main  # noqa: E402

builder.fuse_embedding_wgrad = lambda model: False

if __name__ == "__main__":
    sys.exit(main())
