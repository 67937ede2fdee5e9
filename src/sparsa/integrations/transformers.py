"""Hugging Face transformers: alpha-entmax, ASEntmax and SSMax attention in existing models.

Importing this module registers the attention implementation ``"sparsa"``
with transformers' ``AttentionInterface`` (and the boolean-mask builder that
goes with it), so models written against that interface (Llama, Qwen2/3,
Mistral, Gemma, ...) run their attention through :func:`sparsa.attention`::

    from transformers import AutoModelForCausalLM
    from sparsa.integrations.transformers import from_pretrained, sparsify

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")
    sparsify(model, alpha=1.5, scaling="asentmax")   # in place, returns model
    ...                                              # fine-tune, generate
    model.save_pretrained("converted")
    model = from_pretrained("converted")             # reloads as converted

    # exact sparse decoding: reads only the cache pages that can hold weight
    out = model.generate(ids, past_key_values=PagedCache(model), max_new_tokens=64)

:func:`sparsify` adds a :class:`SparsaControls` module (``.sparsa``) to every
attention module: the entmax alpha (fixed, or learnt per head) and the
length-aware scaling of the queries, whose ASEntmax projections read the
attention module's input.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import types
import warnings
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor, nn

from ..attention import BACKENDS, DecodeStats, KeyPadding, PagedKVCache, attention, attention_weights, decode
from ..layers import SCALINGS, alpha_from_logit, learnable_alpha, length_log, make_scaling, scale_heads
from ..layers.attention import row_map_parameters, weighting_options
from ..normalize._validate import compute_dtype
from ..normalize.rowmaps import get_row_map

try:
    import transformers
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sparsa.integrations.transformers needs transformers>=4.56: pip install 'sparsa[transformers]'"
    ) from error

IMPLEMENTATION = "sparsa"
"""The ``attn_implementation`` name under which sparsa's attention is registered."""

CONFIG_KEY = "sparsa"
"""The model-config attribute that records the conversion (saved in config.json)."""

UNSUPPORTED_CALL_OPTIONS = {"position_bias": "additive position biases"}
WEIGHTS_WARNING_ENTRIES = 1 << 27
"""output_attentions warns from this many weights per layer on (half a gigabyte in fp32)."""


class SparsaControls(nn.Module):
    """What sparsa adds to one attention module: the entmax alpha and the query scaling.

    Args:
        d_model: width of the attention module's input (hidden size).
        n_heads: query heads.
        alpha: entmax alpha (1.0 = softmax, 1.5, 2.0 = sparsemax, any >= 1);
            the start value in (1, 2) when ``learn_alpha``.
        learn_alpha: learn one alpha per head, alpha = 1 + sigmoid(logit).
        scaling: None or one of :data:`sparsa.layers.SCALINGS`.
        scaling_options: keyword arguments of the scaling's constructor.
        heads: indices of the heads to scale (all by default).
        backend: passed to :func:`sparsa.attention`.
        row_map: instead of alpha-entmax, a row map of the related work
            (:data:`sparsa.normalize.ROW_MAPS`), its per-head parameters
            learnt here; ``row_options`` fixed.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        alpha: float,
        learn_alpha: bool,
        scaling: str | None,
        scaling_options: dict,
        heads: Sequence[int],
        backend: str,
        row_map: str | None = None,
        row_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.backend = n_heads, backend
        self.row_map, self.row_options = row_map, dict(row_options or {})
        self.row_parameters = row_map_parameters(row_map, self.row_options, n_heads, learn_alpha)
        self.fixed_alpha = float(alpha)
        self.alpha_logit = learnable_alpha(alpha, n_heads) if learn_alpha else None
        self.register_buffer("scaled_heads", torch.tensor(list(heads), dtype=torch.long), persistent=False)
        self.scaling = make_scaling(scaling, d_model, len(heads), **scaling_options)
        self.input: Tensor | None = None
        self.pages: PagedLayer | None = None
        """The :class:`PagedCache` layer that took this module's new keys, until attention reads it."""
        self.register_buffer("alibi_slopes", None, persistent=False)
        """(H,) for the families whose module adds ALiBi itself (BLOOM, MPT); None otherwise."""

    @property
    def alpha(self) -> float | Tensor:
        return self.fixed_alpha if self.alpha_logit is None else alpha_from_logit(self.alpha_logit)

    def weighting(self) -> dict:
        return weighting_options(self.alpha, self.row_map, self.row_parameters, self.row_options)

    def query_scale(self, visible_keys: Tensor) -> Tensor:
        """Multipliers (B, H, Nq) of the queries for (B, Nq) visible keys; needs a scaling."""
        if self.input is None:
            raise RuntimeError(
                "the attention module's input was not recorded; convert the model with sparsify()"
            )
        log_n = length_log(visible_keys.clamp(min=1), compute_dtype(self.input.dtype))
        return scale_heads(self.scaling, self.input, log_n, self.n_heads, self.scaled_heads)


def sparsa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    alibi_slopes: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function signature over :func:`sparsa.attention`.

    query (B, H, Nq, D), key and value (B, Hkv, Nk, D) as the model passes
    them (grouped-query heads are not repeated); ``attention_mask`` is the
    4D mask transformers built (bool, True = attend, or additive float; a
    causal mask over left- or right-padded keys is passed on as
    :class:`KeyPadding`, which the fused kernels take) or None, which
    transformers passes for a causal module only when the causal mask is all
    it needs: one query after the cache sees every key, and Nq
    queries over Nk >= Nq keys (prefilling an empty static cache) are the
    first Nq keys, as with torch SDPA's ``is_causal``. Returns the output as
    (B, Nq, H, D), and with ``output_attentions`` (in the call or the
    config) the entmax weights (B, H, Nq, Nk), computed densely, as eager
    attention gives them; None otherwise. ``alibi_slopes`` (H,) come from
    the adapters of families that add ALiBi in their own modules.
    """
    for option, what in UNSUPPORTED_CALL_OPTIONS.items():
        if kwargs.get(option) is not None:
            raise ValueError(f"sparsa attention does not implement {what} ({option}={kwargs[option]!r})")
    controls = getattr(module, "sparsa", None)
    if not isinstance(controls, SparsaControls):
        raise ValueError(
            f"{type(module).__name__} has no sparsa settings: convert the model with "
            "sparsa.integrations.transformers.sparsify(model, ...) or load it with from_pretrained"
        )
    pages, controls.pages = controls.pages, None
    wants_weights = bool(
        kwargs.get("output_attentions")
        or getattr(getattr(module, "config", None), "output_attentions", False)
    )
    if wants_weights and controls.row_map is not None:
        raise ValueError(
            f"output_attentions returns alpha-entmax weights; row map {controls.row_map!r} has none"
        )
    n_q = query.shape[2]
    n_k = key.shape[2] if pages is None else pages.positions
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if attention_mask is not None:
        attention_mask = _fit_mask(attention_mask, n_k)
    # Gemma 2's soft-capped scores and GPT-OSS's attention sinks (one logit per head).
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    window = kwargs.get("sliding_window")
    # A causal window at least as long as the keys hides none of them: plain causal attention.
    if window is not None and n_k <= window:
        window = None
    if window is not None and not causal:
        raise ValueError(f"sparsa attention implements causal sliding windows only (sliding_window={window})")
    if window is None and attention_mask is None and causal and 1 < n_q < n_k and pages is None:
        # transformers leaves out the mask here only when prefilling an empty static cache: the
        # queries are the first keys and the rest are unwritten slots (torch SDPA's upper-left causal mask).
        key, value, n_k = key[:, :, :n_q], value[:, :, :n_q], n_q
    if controls.scaling is not None or pages is not None:
        visible = _visible_keys(attention_mask, causal, window, query.shape[0], n_q, n_k, query.device)
    if controls.scaling is not None:
        query = query * controls.query_scale(visible)[..., None].to(query.dtype)
    if pages is not None:
        if not causal:
            raise ValueError("a PagedCache decodes causal attention only")
        if dropout:
            raise ValueError("a PagedCache decodes without attention dropout: call model.eval() first")
        if controls.row_map is not None:
            raise ValueError(
                f"a PagedCache certifies alpha-entmax weights; row map {controls.row_map!r} decodes with "
                "transformers' dense caches"
            )
        if wants_weights:
            raise ValueError(
                "output_attentions needs transformers' dynamic cache: a PagedCache never reads the pages "
                "that hold no weight"
            )
        options = dict(scale=scaling, window=window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
        out = pages.attend(query, key, value, attention_mask, visible[:, -1], controls.alpha, options)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    # A mask from transformers is the truth (it holds the window where the layer has one, as eager
    # attention reads it): passed on as padding and window where it is exactly that, else as the
    # mask alone. Without a mask, the window is what flash kernels would apply.
    if attention_mask is not None:
        padding = KeyPadding.of_causal_mask(attention_mask, window)
        if padding is None:
            attention_mask, causal, window = attention_mask, False, None
        else:
            attention_mask, causal = padding, True
    # One query sees every key either way; row maps that read keys in causal order still say so.
    in_order = controls.row_map is not None and get_row_map(controls.row_map).causal
    options = dict(
        is_causal=causal and (n_q > 1 or in_order or window is not None),
        window=window,
        softcap=softcap,
        sinks=sinks,
        attn_mask=attention_mask,
        scale=scaling,
        alibi_slopes=alibi_slopes,
    )
    out = attention(
        query,
        key,
        value,
        **controls.weighting(),
        **options,
        backend=controls.backend,
        dropout_p=float(dropout),
    )
    weights = None
    if wants_weights:
        entries = query.shape[0] * query.shape[1] * n_q * key.shape[2]
        if entries >= WEIGHTS_WARNING_ENTRIES:
            warnings.warn(
                f"output_attentions holds {entries:,} weights per layer at once (B x H x Nq x Nk)",
                stacklevel=2,
            )
        weights = attention_weights(query, key, alpha=controls.alpha, **options).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def _fit_mask(mask: Tensor, n_k: int) -> Tensor:
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4D (B, 1 or H, Nq, Nk) here, got shape {tuple(mask.shape)}")
    if mask.shape[-1] < n_k:
        raise ValueError(f"attention_mask covers {mask.shape[-1]} keys, the keys are {n_k}")
    return mask[..., :n_k]


def _visible_keys(
    mask: Tensor | None, causal: bool, window: int | None, batch: int, n_q: int, n_k: int, device
) -> Tensor:
    """(B, Nq) number of keys each query attends to."""
    if mask is None:
        if causal:
            seen = torch.arange(n_q, device=device) + (n_k - n_q + 1)
            return (seen if window is None else seen.clamp_max(window)).expand(batch, n_q)
        return torch.full((batch, n_q), n_k, device=device)
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if keep.shape[1] != 1:
        raise ValueError("length-aware scaling needs a mask shared by the heads (B, 1, Nq, Nk)")
    return keep[:, 0].sum(-1).expand(batch, n_q)


def _remember_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    module.sparsa.input = args[0] if args else kwargs["hidden_states"]


def _forget_input(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    module.sparsa.input = None


AttentionInterface.register(IMPLEMENTATION, sparsa_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


class PagedLayer(DynamicLayer):
    """One layer of a :class:`PagedCache`: the real keys and values of each row in a :class:`PagedKVCache`.

    ``update`` only takes the new keys (transformers calls it just before
    the attention function); the attention function appends them and, once
    the prompt is cached, decodes with :func:`sparsa.attention.decode`.
    ``positions`` counts the columns of transformers' attention mask,
    padding included, which is the cache length transformers asks for.
    """

    is_croppable = False

    def __init__(self, page_size: int, max_dropped_mass: float, keep_stats: bool) -> None:
        super().__init__()
        self.page_size, self.max_dropped_mass, self.keep_stats = page_size, max_dropped_mass, keep_stats
        self.positions, self.is_initialized = 0, False
        self.pages: PagedKVCache | None = None
        self.stats: DecodeStats | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.positions += key_states.shape[-2]
        return key_states, value_states

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None,
        visible: Tensor,
        alpha: float | Tensor,
        options: dict,
    ) -> Tensor | None:
        """Append the chunk; None for the prompt (the caller attends over it), else the decoded output.

        ``visible`` (B,) is the number of keys the mask lets each row's last query see; ``options``
        the layer's scale, sliding window (where it hides keys), soft cap and sinks for ``decode``.
        """
        window = options["window"]
        if self.pages is None:
            padding = None if mask is None else KeyPadding.of_causal_mask(mask, window)
            if mask is not None and padding is None:
                raise ValueError(
                    "a PagedCache needs the prompt's mask to be causal over left- or right-padded rows"
                )
            self.pages = PagedKVCache.like(key, value, self.page_size)
            self.pages.append(key, value, padding)
            return None
        self.pages.append(key, value)
        seen = self.pages.lengths if window is None else self.pages.lengths.clamp_max(window)
        if not torch.equal(seen, visible.to(seen.device)):
            raise ValueError(
                "after the prompt a PagedCache takes real tokens only: the attention mask hides keys "
                "that are not padding of the prompt"
            )
        out = decode(
            query, self.pages, alpha=alpha, max_dropped_mass=self.max_dropped_mass,
            return_stats=self.keep_stats, **options,
        )  # fmt: skip
        if self.keep_stats:
            out, self.stats = out
        return out

    def get_seq_length(self, *args) -> int:
        return self.positions

    def reset(self) -> None:
        self.positions, self.pages, self.stats = 0, None, None

    def _unsupported(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "a PagedCache supports greedy decoding and sampling; beam search, assisted decoding and "
            "cropping need the dense cache"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


class PagedCache(Cache):
    """A transformers cache for a :func:`sparsify`-converted model that decodes with exact sparsity.

    Pass it as ``past_key_values`` to ``model.generate`` (or a forward): the
    prompt is attended as usual and cached in pages of ``page_size`` tokens
    per (row, KV head), without its padding; every later step reads only the
    pages whose keys can get weight (:func:`sparsa.attention.decode`), so the
    tokens are those of the dense cache. ``max_dropped_mass`` > 0 allows the
    certified approximation of ``decode``; ``keep_stats`` keeps each layer's
    last :class:`sparsa.attention.DecodeStats` in ``stats``.
    """

    def __init__(
        self,
        model: nn.Module,
        page_size: int = 16,
        *,
        max_dropped_mass: float = 0.0,
        keep_stats: bool = False,
    ) -> None:
        modules = attention_modules(model)
        if not modules or not all(isinstance(getattr(m, "sparsa", None), SparsaControls) for m in modules):
            raise ValueError("PagedCache needs a model converted by sparsify()")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        if isinstance(max_dropped_mass, bool) or not isinstance(max_dropped_mass, Real):
            raise ValueError(f"max_dropped_mass must be a number in [0, 1), got {max_dropped_mass!r}")
        if not 0 <= max_dropped_mass < 1:
            raise ValueError(f"max_dropped_mass must lie in [0, 1), got {max_dropped_mass}")
        controls = {m.layer_idx: m.sparsa for m in modules}
        super().__init__(
            layers=[
                PagedLayer(page_size, float(max_dropped_mass), bool(keep_stats))
                for _ in range(max(controls) + 1)
            ]
        )
        self.controls = controls

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        # A layer handed to its module and not taken back: that module's attention is not sparsa's.
        if any(controls.pages is not None for controls in self.controls.values()):
            raise RuntimeError(
                "the attention of a PagedCache layer did not read its new keys: the model must run "
                f"the '{IMPLEMENTATION}' attention (convert it with sparsify)"
            )
        layer = self.layers[layer_idx]
        keys = layer.update(key_states, value_states)
        self.controls[layer_idx].pages = layer
        return keys

    @property
    def stats(self) -> list[DecodeStats | None]:
        """Each layer's statistics of its last decoding step (with ``keep_stats``)."""
        return [layer.stats for layer in self.layers]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a transformers model that dispatch through ``AttentionInterface``,
    and those of the families sparsa has an adapter for (:data:`ADAPTERS`).

    Found by what their forward calls (transformers' registry of attention functions), not by
    attribute names, which differ between families (``head_dim``, ``head_size``, ...).
    """
    return [
        m
        for m in model.modules()
        if (hasattr(m, "config") and _dispatches_through_interface(m)) or type(m).__name__ in ADAPTERS
    ]


def _dispatches_through_interface(module: nn.Module) -> bool:
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def sparsify(
    model: nn.Module,
    alpha: float = 1.5,
    *,
    scaling: str | None = None,
    heads: str | Sequence[int] = "all",
    learn_alpha: bool = False,
    scaling_options: dict | None = None,
    backend: str = "auto",
    row_map: str | None = None,
    row_options: dict | None = None,
) -> nn.Module:
    """Switch a transformers model's attention to alpha-entmax in place; returns the model.

    Args:
        model: a loaded ``PreTrainedModel`` whose attention modules dispatch
            through ``AttentionInterface`` (Llama, Qwen2/3, Mistral, Gemma,
            GPT-NeoX, GPT-2, OPT, ...).
        alpha: entmax alpha >= 1 (1.0 = softmax, 1.5, 2.0 = sparsemax).
        scaling: None, "ssmax", "asentmax", "asentmax-static", "temperature",
            "learned-temperature", "log-n" (``scaling_options={"train_length":
            L}``, the context the model was trained on) or
            "position-temperature"; added as new parameters initialised
            so the converted model starts close to the original (ASEntmax:
            scale 1 + 0.1 for every query; SSMax: s = 1, i.e. log(n + 1)).
        heads: "all" or the indices of the heads to scale.
        learn_alpha: learn one alpha per head and layer in (1, 2).
        scaling_options: keyword arguments of the scaling (e.g. beta_init).
        backend: attention backend for :func:`sparsa.attention`.
        row_map: instead of alpha-entmax, a row map of the related work
            (:data:`sparsa.normalize.ROW_MAPS`: "topk-softmax",
            "stick-breaking", "adaptive-temperature", "elastic-softmax",
            "nap", "alpha-relu", "sigmoid", "softpick"); its per-head
            parameters are learnt, ``row_options`` fixed (e.g. {"k": 8}).
            ``alpha`` is then unused.

    The settings are stored in ``model.config.sparsa`` so that
    :func:`from_pretrained` rebuilds the converted model.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention module in {type(model).__name__} that sparsa can drive")
    if any(isinstance(getattr(m, "sparsa", None), SparsaControls) for m in modules):
        raise ValueError("model is already converted by sparsify()")
    _check_supported(config)
    n_heads = _config_value(getattr(modules[0], "config", config), "num_attention_heads")
    d_model = _config_value(getattr(modules[0], "config", config), "hidden_size")
    settings = {
        "alpha": _check_alpha(alpha),
        "scaling": _check_scaling(scaling),
        "heads": _check_heads(heads, n_heads),
        "learn_alpha": bool(learn_alpha),
        "scaling_options": dict(scaling_options or {}),
        "backend": _check_backend(backend),
        "row_map": row_map,
        "row_options": dict(row_options or {}),
    }
    # All controls are built before any is attached: bad scaling_options leave the model as it was.
    controls = [SparsaControls(d_model, n_heads, **settings) for _ in modules]
    for module, control in zip(modules, controls, strict=True):
        reference = next(module.parameters())
        module.sparsa = control.to(reference.device, reference.dtype)
        adapter = ADAPTERS.get(type(module).__name__)
        if adapter is not None:
            forward, slopes = adapter
            module.forward = types.MethodType(forward, module)
            module.sparsa.alibi_slopes = slopes(n_heads).to(reference.device)
        if settings["scaling"] is not None:
            module.register_forward_pre_hook(_remember_input, with_kwargs=True)
            module.register_forward_hook(_forget_input, with_kwargs=True)
    setattr(config, CONFIG_KEY, settings)
    # The adapted families' models build eager masks, which their adapters read (a model loaded
    # by from_pretrained comes with the sparsa implementation and is switched back).
    # (Their models refuse set_attn_implementation: they have no attention functions to switch.)
    if all(type(module).__name__ in ADAPTERS for module in modules):
        config._attn_implementation = "eager"
    elif hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(IMPLEMENTATION)
    else:
        config._attn_implementation = IMPLEMENTATION
    return model


def from_pretrained(path: str, model_class=None, **kwargs) -> nn.Module:
    """Load a model saved after :func:`sparsify`, converted again with its learnt sparsa parameters.

    ``model_class`` defaults to ``AutoModelForCausalLM``; ``kwargs`` go to its
    ``from_pretrained`` (dtype, device_map, ...).
    """
    config = transformers.AutoConfig.from_pretrained(path)
    settings = getattr(config, CONFIG_KEY, None)
    if settings is None:
        raise ValueError(f"{path} holds no sparsa settings: it was not saved after sparsify()")
    model_class = model_class or transformers.AutoModelForCausalLM
    kwargs.pop("attn_implementation", None)
    with _quiet_loading():
        model = model_class.from_pretrained(path, attn_implementation=IMPLEMENTATION, **kwargs)
    sparsify(model, **settings)
    expected = {name for name, _ in model.named_parameters() if f".{CONFIG_KEY}." in name}
    saved = _saved_tensors(path, f".{CONFIG_KEY}.")
    missing = expected - saved.keys()
    if missing:
        raise ValueError(f"{path} lacks sparsa parameters {sorted(missing)[:4]}...")
    model.load_state_dict(saved, strict=False)
    return model


def _saved_tensors(path: str, marker: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is None:
        files = [cached_file(path, "model.safetensors")]
    else:
        with open(index) as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        files = [cached_file(path, shard) for shard in shards]
    tensors = {}
    for file in files:
        tensors.update({k: v for k, v in load_file(file).items() if marker in k})
    return tensors


@contextlib.contextmanager
def _quiet_loading():
    """Silence the 'unused weights' report: the sparsa parameters are loaded after conversion."""
    logger = transformers.utils.logging
    level = logger.get_verbosity()
    logger.set_verbosity_error()
    try:
        yield
    finally:
        logger.set_verbosity(level)


def _check_supported(config) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise ValueError(
            f"sparsa attention implements full and sliding-window attention; this model has layers {other}"
        )


def _config_value(config, name: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int):
        raise ValueError(f"the model config has no integer {name}")
    return value


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 1 <= alpha < float("inf"):
        raise ValueError(f"alpha must be a finite number >= 1, got {alpha!r}")
    return float(alpha)


def _check_scaling(scaling: str | None) -> str | None:
    if scaling is not None and scaling not in SCALINGS:
        raise ValueError(f"scaling must be None or one of {SCALINGS}, got {scaling!r}")
    return scaling


def _check_heads(heads: str | Sequence[int], n_heads: int) -> list[int]:
    if heads == "all":
        return list(range(n_heads))
    if isinstance(heads, str) or not isinstance(heads, Sequence):
        raise ValueError(f"heads must be 'all' or a sequence of head indices, got {heads!r}")
    chosen = sorted(set(heads))
    if not chosen or any(
        isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < n_heads for h in chosen
    ):
        raise ValueError(f"heads must be distinct indices in [0, {n_heads}), got {list(heads)}")
    return chosen


def _check_backend(backend: str) -> str:
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}")
    return backend


# Families whose attention modules add ALiBi in their own forward instead of calling an attention
# function: their forward is replaced by one that computes the same projections, updates the same
# cache and calls :func:`sparsa_attention` with the family's slopes. ALiBi there adds slope * key
# position; sparsa adds slope * (key - query position), which differs by a constant per row, and
# entmax, like softmax, does not change when a row is shifted.


def _cache_argument(kwargs: dict):
    """The layer cache, under whichever name this transformers release passes it."""
    for name in ("layer_past", "cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _bloom_forward(self, hidden_states, residual, alibi=None, attention_mask=None, **kwargs):
    from transformers.models.bloom.modeling_bloom import dropout_add

    batch, n, _ = hidden_states.shape
    fused = self.query_key_value(hidden_states).view(batch, n, self.num_heads, 3, self.head_dim)
    query, key, value = (fused[..., i, :].transpose(1, 2) for i in range(3))
    cache = _cache_argument(kwargs)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    # BLOOM's model builds an additive eager mask (0 or the dtype's minimum).
    keep = None if attention_mask is None else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    out, weights = sparsa_attention(
        self, query, key, value, keep, dropout=self.attention_dropout.p if self.training else 0.0,
        scaling=self.inv_norm_factor, alibi_slopes=self.sparsa.alibi_slopes,
        output_attentions=kwargs.get("output_attentions"),
    )  # fmt: skip
    out = self.dense(out.reshape(batch, n, -1))
    return dropout_add(out, residual, self.hidden_dropout, self.training), weights


def _bloom_slopes(n_heads: int) -> Tensor:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # The bias of key position 1 is the slope.
    return build_alibi_tensor(torch.ones(1, 2), n_heads, torch.float32)[:, 0, 1]


def _mpt_forward(self, hidden_states, position_bias=None, attention_mask=None, **kwargs):
    batch, n, _ = hidden_states.shape
    mixed = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed = mixed.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (
        x.reshape(batch, n, self.n_heads, self.head_dim).transpose(1, 2) for x in mixed.chunk(3, dim=2)
    )
    cache = _cache_argument(kwargs)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    # MPT's model passes a bool mask with True where a key is hidden.
    keep = None if attention_mask is None else ~attention_mask
    out, weights = sparsa_attention(
        self, query, key, value, keep, dropout=self.attn_dropout_p if self.training else 0.0,
        scaling=self.softmax_scale, alibi_slopes=self.sparsa.alibi_slopes,
    )  # fmt: skip
    return self.out_proj(out.reshape(batch, n, -1)), weights


def _mpt_slopes(n_heads: int) -> Tensor:
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    # MPT's model builds its bias with the default alibi_bias_max; consecutive keys differ by the slope.
    bias = build_mpt_alibi_tensor(n_heads, 2)[:, 0]
    return (bias[:, 1] - bias[:, 0]).float()


ADAPTERS = {"BloomAttention": (_bloom_forward, _bloom_slopes), "MptAttention": (_mpt_forward, _mpt_slopes)}
"""Attention module class name -> (its sparsa forward, its ALiBi slopes for H heads)."""
