"""transformers integration: `model.generate()` with a squeezed KV cache.

    cache = SqueezeCache(model, SequencePolicy.h2o(), SqueezeSettings.squeeze(b_init=0.3), max_new_tokens=64)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

SqueezeCache is a transformers `Cache` whose storage is a SqueezeKVCache (one page pool; rows of
(sequence, layer, KV head), each with its own budget). Constructing it switches the model's
attention implementation to "squeeze", registered here with transformers' AttentionInterface
(and a mask function with its AttentionMaskInterface that hands the 2-D padding mask through):

    prompt forward, per layer l:
        decoder layer pre-hook          x_in (the residual stream entering the layer)
        Cache.update(k, v, l)           hands the layer's new K/V (after RoPE) to the attention
        attention function              packs the batch's real tokens (the 2-D mask: left padding
                                        never enters the cache nor receives scores) and runs
                                        PrefillRecord.attend (prefill_attention with the scores
                                        the policy and allocator read); the layer's K/V are
                                        compressed at once into rows reserved at the largest
                                        budget the allocator can give (SqueezeKVCache.reserve)
        post-attention-norm pre-hook    x_mid = x_in + attention: cos_sum[l, b] += sum_t
                                        cos(x_in, x_mid) over the real tokens (plain PyTorch,
                                        one pass over [T, hidden] per layer, prompt only)
        after the last layer            SqueezeKVCache.admit: budgets planned on the device,
                                        every row evicted to its budget
    each generated token, per layer: the attention function runs SqueezeKVCache.attend
    (decode_step_: append the new K/V, attend, accumulate scores, evict); no host sync.

Positions are transformers' own (position_ids from the attention mask: each sequence's tokens
count from 0, pads excluded), so a compressed cache never shifts RoPE; get_seq_length() is the
logical length (padded prompt + tokens generated), as generate expects.

Served: Llama, Mistral (full attention), Qwen2 and Qwen3 decoder blocks (model_type llama,
mistral, qwen2, qwen3), any RoPE (keys are cached after RoPE and never re-rotated, as in
transformers' own cache). Refused with a ValueError: other architectures, sliding-window
layers. Beam search, batch selection and repetition go through SqueezeKVCache.reorder (a beam
chosen twice is forked into pages of its own). Refused with a ValueError: crop (assisted
decoding: tokens once appended cannot be taken back) and any forward of more than one token
after the prompt (multi-turn continuation, chunked prefill); reset() makes the cache empty again.
A forward of the model without a SqueezeCache (another cache or use_cache=False) runs
transformers' SDPA attention with the causal and padding masks.
"""
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # transformers is an optional extra
    raise ImportError("squeeze_ops.models.hf needs transformers 5.x: pip install 'transformers>=5.0,<5.2'") from error

from ..engine.cache import PrefillRecord, SqueezeKVCache, _settings_list
from ..engine.policies import SequencePolicy, prefill_needs
from ..reference import COS_EPS

ATTENTION = "squeeze"
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Cache.update of layer l hands (cache, l) to the attention function that runs right after it on
# the same thread; the decoder layer's pre-hook hands (cache, l, x_in) to its post-attention norm.
_handoff = threading.local()


class SqueezeLayer(CacheLayerMixin):
    """One decoder layer's view of a SqueezeCache: its logical length (tokens seen, pads
    included, in transformers' index space). The K/V live in the SqueezeCache's pool."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.seen = 0

    def lazy_initialization(self, key_states, value_states=None):
        self.is_initialized = True

    def update(self, key_states, value_states, cache_kwargs=None):
        """Counts the new tokens; returns the new K/V only (the attention reads the rest)."""
        self.is_initialized = True
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self):
        return self.seen

    def get_mask_sizes(self, cache_position):
        return self.seen + cache_position.shape[0], 0

    def get_max_cache_shape(self):
        return -1

    def reset(self):
        self.seen = 0

    def offload(self):
        pass

    def prefetch(self):
        pass


@dataclass
class _Prefill:
    """The prompt forward in progress."""

    record: PrefillRecord
    index: torch.Tensor     # int64 [T_total]: flat indices into [B * T] of the real tokens
    sequence: torch.Tensor  # int64 [T_total]: the sequence of each real token
    batch: int
    width: int              # T, the padded prompt length
    signals: tuple = ()     # (q, k, v, lse, scores, out_proj, scale) of the layer in flight (perturbation)


class SqueezeCache(Cache):
    """A transformers Cache holding squeezed KV: pass it as `past_key_values` to
    `model.generate` (or to the model's forward: the prompt first, then one token per call).

    Args:
        model: a Llama / Mistral / Qwen2 / Qwen3 causal LM of transformers (any device and
            dtype the library's ops serve: fp32 on CPU; fp16 / bf16 on a GPU). Its attention
            implementation is set to "squeeze" and its generation_config.cache_implementation
            to None (generate refuses a cache of ours otherwise).
        policy: the SequencePolicy of every row (window, streaming, h2o, SnapKV-style scores).
        settings: SqueezeSettings (or one per sequence, or None for the full cache: nothing is
            evicted) that plan the budgets from the prompt's layer similarities.
        max_new_tokens: the most tokens generate will produce per sequence; the first comes
            from the prompt's forward, so the cache admits max_new_tokens - 1 decode forwards
            (each appends one token) and refuses more.
        page_size: tokens per page of the pool.
    After the prompt's forward, `kv` is the SqueezeKVCache (budgets, similarity, labels,
    diagnostics, memory()); before it, None.
    """

    def __init__(self, model, policy, settings, max_new_tokens, page_size=16):
        config = model.config
        _check_model(config)
        if not isinstance(policy, SequencePolicy):
            raise TypeError(f"policy: expected a SequencePolicy, got {type(policy).__name__}")
        prefill_needs(policy, settings)  # checks the settings' types
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size: expected an int >= 1, got {page_size!r}")
        self.policy, self.settings, self.max_new_tokens, self.page_size = policy, settings, max_new_tokens, page_size
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        super().__init__(layers=[SqueezeLayer() for _ in range(self.num_layers)])
        self.kv = None
        self._prefill = None
        self._steps = 0
        if config._attn_implementation != ATTENTION:
            model.set_attn_implementation(ATTENTION)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.cache_implementation = None
        _install_hooks(model)

    # ---- transformers' Cache API ----

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        """Layer layer_idx's new K/V [B, Hkv, q, D] (after RoPE): handed to the "squeeze"
        attention that runs next. Returns them unchanged (never the cached past)."""
        stale = getattr(_handoff, "pending", None)
        if stale is not None:
            _handoff.pending = None
            raise RuntimeError(f"SqueezeCache: layer {stale[1]}'s keys and values were not read by the "
                               f"'{ATTENTION}' attention; the model's attention implementation was changed after "
                               "the cache was made")
        layer = self.layers[layer_idx]
        queries = key_states.shape[-2]
        if layer.seen and queries != 1:
            raise ValueError(f"SqueezeCache: a forward of {queries} tokens after the prompt (multi-turn "
                             "continuation, chunked prefill or assisted decoding) is not supported: a squeezed "
                             "cache takes one token per forward after the prompt; start a new SqueezeCache or "
                             "reset() this one")
        out = layer.update(key_states, value_states, cache_kwargs)
        _handoff.pending = (self, layer_idx)
        return out

    def reset(self):
        """Empty again: every page back to the pool."""
        if self._prefill is not None and self._prefill.record.reserved is not None:
            self._prefill.record.reserved.release()
        if self.kv is not None:
            self.kv.retire(self.kv.ids)
        self.kv, self._prefill, self._steps = None, None, 0
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx):
        """Beam search: sequence i continues sequence beam_idx[i] (SqueezeKVCache.reorder: a beam
        chosen twice is forked into pages of its own). Reads beam_idx to the host."""
        self._reorder(beam_idx)

    def batch_select_indices(self, indices):
        """Keeps the sequences `indices` (in that order); the others' pages go back to the pool."""
        self._reorder(indices)

    def batch_repeat_interleave(self, repeats):
        """Every sequence repeated `repeats` times in place (forks with pages of their own)."""
        if self.kv is not None:
            self._reorder([b for b in range(self.kv.batch) for _ in range(repeats)])

    def _reorder(self, rows):
        if self._prefill is not None:
            raise RuntimeError("SqueezeCache: the batch cannot change during the prompt's forward")
        if self.kv is None:  # before the prompt nothing is stored: the prompt's forward sets the batch
            return
        self.kv.reorder(rows, grow=True)  # the pool is this cache's own

    def crop(self, max_length):
        """A crop that removes nothing (max_length >= the tokens seen) does nothing; any other is
        refused: appending those tokens may have evicted others, so they cannot be taken back."""
        seen = self.get_seq_length()
        if 0 <= seen <= max_length:
            return
        raise ValueError(f"SqueezeCache: crop({max_length}) of a cache that has seen {seen} tokens (assisted "
                         "decoding): a squeezed cache cannot take tokens back, since appending them may have "
                         "evicted others; use greedy, sampling or beam search")

    @property
    def is_compileable(self):
        return False

    # ---- the attention of one layer ----

    def _attend(self, module, layer, query, key, value, attention_mask, scale):
        """query [B, H, q, D], key/value [B, Hkv, q, D] -> [B, q, H, D]."""
        if self.layers[layer].seen == query.shape[2]:
            return self._prefill_layer(module, layer, query, key, value, attention_mask, scale)
        return self._decode_layer(layer, query, key, value, scale)

    def _prefill_layer(self, module, layer, query, key, value, attention_mask, scale):
        B, H, T, D = query.shape
        if layer == 0:
            self._start(B, T, attention_mask, query.dtype, query.device)
        state = self._prefill
        if state is None or state.record.layers_added != layer:
            raise RuntimeError(f"SqueezeCache: layer {layer}'s prompt forward out of order")

        def packed(x):  # [B, heads, T, D] -> the real tokens [T_total, heads, D]
            return x.transpose(1, 2).reshape(B * T, x.shape[1], D).index_select(0, state.index)

        q, k, v = packed(query), packed(key), packed(value)
        out, lse, scores = state.record.attend(q, k, v, scale)
        if state.record.needs.perturb:
            state.signals = (q, k, v, lse, scores, module.o_proj.weight, scale)
        full = out.new_zeros(B * T, H, D)
        full.index_copy_(0, state.index, out)
        return full.view(B, T, H, D)

    def _start(self, batch, width, attention_mask, dtype, device):
        """The prompt forward begins: its real tokens, the pool and the rows reserved for them."""
        if attention_mask is None:
            real = torch.ones(batch, width, dtype=torch.bool, device=device)
        else:
            real = attention_mask[:, -width:].to(device=device, dtype=torch.bool)
        lens = real.sum(1).tolist()
        if min(lens) < 1:
            raise ValueError(f"attention_mask: sequences {[b for b, n in enumerate(lens) if n < 1]} have no token")
        settings = _settings_list(self.settings, batch)
        if len(settings) != batch:
            raise ValueError(f"settings: expected one per sequence ({batch}), got {len(settings)}")
        steps = self.max_new_tokens - 1
        self.kv = SqueezeKVCache.for_prompts(lens, settings, steps, self.policy, self.num_layers, self.num_kv_heads,
                                             self.head_dim, dtype, device, self.page_size)
        reserved = self.kv.reserve(lens, settings, steps)
        record = PrefillRecord.start(lens, self.num_layers, device, prefill_needs(self.policy, settings), reserved)
        sequence = torch.repeat_interleave(torch.arange(batch, device=device), torch.tensor(lens, device=device))
        self._prefill = _Prefill(record, real.reshape(-1).nonzero().squeeze(1), sequence, batch, width)

    def _after_attention(self, layer, x_in, x_mid):
        """The post-attention residual of a prompt layer: similarity sums, perturbation, and the
        budgets planned and admitted after the last layer."""
        state = self._prefill
        if state is None or state.record.layers_added != layer + 1:
            _handoff.pending = None
            raise RuntimeError(f"SqueezeCache: layer {layer}'s attention did not run through the '{ATTENTION}' "
                               "attention; the model's attention implementation was changed after the cache was made")
        x_in = x_in.reshape(state.batch * state.width, -1).index_select(0, state.index)
        x_mid = x_mid.reshape(state.batch * state.width, -1).index_select(0, state.index)
        cos = F.cosine_similarity(x_in.double(), x_mid.double(), dim=-1, eps=COS_EPS).float()
        state.record.cos_sum[layer].index_add_(0, state.sequence, cos)
        if state.signals:
            q, k, v, lse, scores, out_proj, scale = state.signals
            state.record.add_perturbation(q, k, v, lse, scores, out_proj, x_mid, scale)
            state.signals = ()
        if layer == self.num_layers - 1:
            self._prefill = None
            self.kv.admit(state.record, _settings_list(self.settings, state.batch), self.max_new_tokens - 1)

    def _decode_layer(self, layer, query, key, value, scale):
        B = query.shape[0]
        if self.kv is None or self._prefill is not None:
            raise RuntimeError("SqueezeCache: a decode forward before the prompt's forward completed")
        if layer == 0:
            if B != self.kv.batch:
                raise ValueError(f"SqueezeCache: a forward of {B} sequences, the cache holds {self.kv.batch} "
                                 "(between forwards the batch changes through reorder_cache, batch_select_indices or "
                                 "batch_repeat_interleave)")
            if self._steps >= self.max_new_tokens - 1:
                raise ValueError(f"max_new_tokens: this SqueezeCache was made for {self.max_new_tokens} new "
                                 f"tokens ({self.max_new_tokens - 1} decode forwards after the prompt's); make it "
                                 "with a larger max_new_tokens")
            self.kv.begin_step(B)
        out = self.kv.attend(layer, query[:, :, 0].contiguous(), key[:, :, 0].contiguous(),
                             value[:, :, 0].contiguous(), scale)
        if layer == self.num_layers - 1:
            self.kv.advance(B)
            self.kv.end_step()
            self._steps += 1
        return out[:, None]


def _check_model(config):
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model: SqueezeCache serves the decoder blocks of {MODEL_TYPES}, got {model_type!r}")
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = any(t != "full_attention" for t in layer_types) or (
        not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))
    if sliding:
        raise ValueError("model: layers with a sliding attention window are not supported (the config's "
                         "sliding_window / layer_types); a squeezed cache replaces the window")


def squeeze_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention function "squeeze": query [B, H, q, D], key/value [B, Hkv, q, D]
    (what SqueezeCache.update returned: the new tokens), attention_mask the 2-D padding mask
    [B, past + q] (bool) or None. Returns ([B, q, H, D], None)."""
    pending = getattr(_handoff, "pending", None)
    if pending is None:
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    _handoff.pending = None
    cache, layer = pending
    if layer != module.layer_idx:
        raise RuntimeError(f"SqueezeCache: layer {layer}'s keys reached layer {module.layer_idx}'s attention")
    if module.training and dropout:
        raise ValueError("SqueezeCache: attention dropout (training) is not supported")
    if kwargs.get("sliding_window"):
        raise ValueError("SqueezeCache: sliding-window attention layers are not supported")
    scale = module.scaling if scaling is None else scaling
    return cache._attend(module, layer, query, key, value, attention_mask, scale), None


def _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """A forward without a SqueezeCache: transformers' SDPA attention, causal over the full K/V
    [B, Hkv, kv, D] (the last q keys are the queries'), padding from the 2-D mask."""
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = None
    if attention_mask is not None or (q_len > 1 and kv_len != q_len):
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= q_pos)[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -kv_len:].to(device=query.device, dtype=torch.bool)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def padding_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None,
                 **kwargs):
    """transformers' mask function "squeeze": the 2-D padding mask [B, past + q] as given (or
    None); the attention applies causality itself."""
    return attention_mask


def _install_hooks(model):
    """The residual-stream hooks of every decoder layer, once per model: they act only during a
    SqueezeCache's prompt forward."""
    layers = model.model.layers
    if getattr(model, "_squeeze_hooks", None) is not None:
        return
    handles = []
    for index, block in enumerate(layers):
        def before_layer(module, args, kwargs, index=index):
            cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
            if isinstance(cache, SqueezeCache) and cache.layers[index].seen == 0:  # the prompt's forward
                _handoff.residual = (cache, index, args[0] if args else kwargs["hidden_states"])

        def after_attention(module, args, index=index):
            pending = getattr(_handoff, "residual", None)
            if pending is not None and pending[1] == index:
                _handoff.residual = None
                cache, _, x_in = pending
                cache._after_attention(index, x_in, args[0])

        handles.append(block.register_forward_pre_hook(before_layer, with_kwargs=True))
        handles.append(block.post_attention_layernorm.register_forward_pre_hook(after_attention))
    model._squeeze_hooks = handles


AttentionInterface.register(ATTENTION, squeeze_attention)
AttentionMaskInterface.register(ATTENTION, padding_mask)
