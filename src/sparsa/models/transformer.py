"""A decoder-only transformer built from sparsa layers, readable in one sitting."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .._version import __version__
from ..layers import SparseAttention, SwiGLU, TokenLayout
from .cache import KVCache
from .config import TransformerConfig
from .generation import generate

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)), with dropout on both branches."""

    def __init__(self, config: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attention = SparseAttention(
            config.d_model,
            config.n_heads,
            config.n_kv_heads,
            alpha=config.alpha,
            learn_alpha=config.learn_alpha,
            scaling=config.scaling,
            scaling_options=config.scaling_options,
            scaled_heads=config.scaled_heads,
            positions=config.positions,
            alibi_slopes=config.alibi_slopes,
            rope_theta=config.rope_theta,
            window=config.layer_window(layer),
            backend=config.backend,
            row_map=config.row_map,
            row_options=config.row_options,
            gate=config.gate,
        )
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, layout: TokenLayout, cache, last_tokens: int | None = None) -> Tensor:
        """x (B, N, d_model) -> the same, or only the last ``last_tokens`` positions of it."""
        attended = self.attention(self.attention_norm(x), layout, cache, last_queries=last_tokens)
        x = x[:, x.shape[1] - attended.shape[1] :] + self.dropout(attended)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Decoder-only language model: embeddings, ``n_layers`` blocks, final RMSNorm, output head.

    Initialisation: weights N(0, init_std), the two projections that write
    into the residual stream (attention output, MLP down) scaled by
    1/sqrt(2 n_layers) so the residual variance does not grow with depth;
    scaling modules keep their own initialisation (scale near 1).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            attn, mlp = block.attention, block.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate, mlp.up):
                nn.init.normal_(linear.weight, std=std)
            for linear in (attn.o_proj, mlp.down):
                nn.init.normal_(linear.weight, std=residual_std)

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Trainable parameters, each shared tensor counted once."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}
        if exclude_embeddings:
            params.pop(id(self.embed.weight), None)
            params.pop(id(self.head.weight), None)
        return sum(p.numel() for p in params.values())

    def new_cache(self, capacity: int = 0, *, page_size: int | None = None) -> KVCache:
        """An empty cache; ``page_size`` pages it for exact sparse decoding (see :class:`KVCache`)."""
        return KVCache(self.config.n_layers, capacity, page_size=page_size)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int | None = None,
    ) -> Tensor:
        """Logits (B, N, vocab) for input_ids (B, N).

        ``attention_mask`` (B, cached + N): 1 for real tokens, 0 for padding
        on one side (left for generation). ``cache`` holds earlier tokens and
        receives these. ``logits_to_keep``: logits for the last that many
        positions only; the last block then attends from those positions only
        (every position still gives the keys and values it needs).
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a tensor of shape (batch, length)")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size})")
        batch, n = input_ids.shape
        n_past = 0 if cache is None else cache.length
        layout = TokenLayout.build(batch, n, n_past, attention_mask, input_ids.device)
        x = self.dropout(self.embed(input_ids))
        if logits_to_keep is not None and (
            isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 1
        ):
            raise ValueError(f"logits_to_keep must be a positive integer or None, got {logits_to_keep!r}")
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(
                x, layout, None if cache is None else cache.layers[i], logits_to_keep if i == last else None
            )
        return self.head(self.norm(x))

    def generate(self, input_ids: Tensor, max_new_tokens: int, **options) -> Tensor:
        """Decode with a KV cache; see :func:`sparsa.models.generate`."""
        return generate(self, input_ids, max_new_tokens, **options)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write config.json and model.safetensors to ``directory`` (created if needed).

        ``dtype`` (e.g. torch.float16) stores the weights in that precision;
        :meth:`from_pretrained` loads them into an fp32 model.
        """
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"sparsa_version": __version__, "model": "Transformer", "config": self.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        stored = self if dtype is None else copy.deepcopy(self).to(dtype)
        save_model(stored, str(directory / WEIGHTS_FILE))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Transformer:
        """Rebuild a model written by :meth:`save_pretrained`."""
        from safetensors.torch import load_model

        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
        meta = json.loads(config_path.read_text())
        if meta.get("model") != "Transformer":
            raise ValueError(f"{config_path} does not describe a sparsa Transformer")
        model = cls(TransformerConfig.from_dict(meta["config"]))
        load_model(model, str(directory / WEIGHTS_FILE), strict=True, device=str(device))
        return model.to(device)
