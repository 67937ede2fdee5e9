"""Hugging Face breadth: every causal-LM architecture of the installed transformers, converted or refused.

Each architecture is built from its own config at a tiny size (random weights), run on 12
tokens, converted with ``sparsify(model, alpha=1.0)`` and run again: at alpha = 1 without a
scaling the converted model must give the original logits. A refusal is reported with its
one-line reason, so the table says which feature each family still lacks.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from .timing import machine, machine_line, markdown

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rotary_dim": 8,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "sliding_window": 4,
}
"""Sizes given to every config (transformers maps them to each family's own names where it can);
a config that refuses one of them is built again without it. The sliding window of 4 (for
families whose config has one) makes windowed layers hide keys within the 12 tokens of the check."""
TOKENS = 12
GENERATED = 6
"""Tokens generated greedily in the PagedCache check."""
MAX_PARAMETERS = 5_000_000
"""Families whose config keeps larger sizes than TINY sets (vocabularies, widths) are not built."""
MATCH = 1e-5
"""Largest logit difference at alpha = 1 that counts as the original model."""


def architectures() -> list[str]:
    """The model types that transformers can build as a causal LM, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check(model_type: str) -> dict:
    """One row: converts (with the logit difference), differs, refused (why) or not built (why)."""
    import transformers

    from ..integrations.transformers import sparsify

    row = {"model_type": model_type}
    try:
        config = _tiny_config(transformers, model_type)
        # Counted on the meta device first: a family whose sizes TINY does not reach is skipped, not built.
        with torch.device("meta"):
            size = transformers.AutoModelForCausalLM.from_config(config).num_parameters()
        if size > MAX_PARAMETERS:
            return {**row, "status": "not built", "reason": f"its tiny config still has {size:,} parameters"}
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        ids = torch.randint(4, TINY["vocab_size"], (1, TOKENS))
        with torch.no_grad():
            original = model(ids).logits
    except Exception as error:  # a family whose tiny model cannot be built is reported, not raised
        return {**row, "status": "not built", "reason": _one_line(error)}
    try:
        sparsify(model, 1.0)
        with torch.no_grad():
            converted = model(ids).logits
    except (ValueError, TypeError, NotImplementedError) as error:
        return {**row, "status": "refused", "reason": _one_line(error)}
    difference = float((converted.float() - original.float()).abs().max())
    status = "converts" if difference <= MATCH else "differs"
    return {**row, "status": status, "max_logit_difference": difference, "paged": _paged_generation(config)}


def _paged_generation(config) -> str:
    """Whether greedy generation from 12 tokens with a PagedCache gives the tokens of transformers'
    dynamic cache, both converted to 1.5-entmax: "same", "differs", or why it is refused."""
    import transformers

    from ..integrations.transformers import PagedCache, sparsify

    torch.manual_seed(0)
    model = sparsify(transformers.AutoModelForCausalLM.from_config(config).eval(), 1.5)
    ids = torch.randint(4, TINY["vocab_size"], (1, TOKENS))
    options = {"max_new_tokens": GENERATED, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    names = getattr(transformers.generation.utils, "ALL_CACHE_NAMES", ())
    cache_argument = "cache" if "cache" in names else "past_key_values"
    try:
        with torch.no_grad():
            dense = model.generate(ids, **options)
            paged = model.generate(ids, **options, **{cache_argument: PagedCache(model)})
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
        return _one_line(error)
    return "same" if torch.equal(dense, paged) else "differs"


def _tiny_config(transformers, model_type: str):
    sizes = dict(TINY)
    if not hasattr(transformers.AutoConfig.for_model(model_type), "sliding_window"):
        # A family without windows may still pass the attribute on to attention functions.
        del sizes["sliding_window"]
    while True:
        try:
            config = transformers.AutoConfig.for_model(model_type, **sizes)
            break
        except (AttributeError, TypeError, ValueError) as error:
            refused = [name for name in sizes if name in str(error)]
            if not refused:
                raise
            del sizes[refused[0]]
    if hasattr(config, "kv_lora_rank"):
        # Multi-head latent attention (DeepSeek) expands its latent keys to every query head.
        config.num_key_value_heads = config.num_attention_heads
    return config


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def run(model_types: list[str]) -> dict:
    import transformers

    start = time.perf_counter()
    rows = [check(model_type) for model_type in model_types]
    return {
        "benchmark": "hf",
        "transformers_version": transformers.__version__,
        **machine(),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }


def markdown_table(result: dict) -> str:
    headers = ["architecture", "result", "max logit difference", "PagedCache generation", "reason"]
    rows = []
    for row in result["rows"]:
        difference = row.get("max_logit_difference")
        shown = "" if difference is None else f"{difference:.1e}"
        cells = [row["model_type"], row["status"], shown, row.get("paged", ""), row.get("reason", "")]
        rows.append([cell.replace("|", "\\|") for cell in cells])
    counts = Counter(row["status"] for row in result["rows"])
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    table = markdown(headers, {"max logit difference"}, rows)
    return f"{table}\n\n{len(result['rows'])} architectures: {summary}."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", nargs="+", default=None, help="model types (default: every causal-LM architecture)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for hf.json")


def run_from_args(args: argparse.Namespace) -> int:
    known = architectures()
    unknown = sorted(set(args.models or ()) - set(known))
    if unknown:
        raise ValueError(f"--models: not causal-LM architectures of this transformers: {unknown}")
    result = run(args.models or known)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hf.json"
    path.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    print(f"\nMachine: {machine_line(result)}; transformers {result['transformers_version']}.")
    print(f"wrote {path}")
    return 0
