"""A small Llama-family runner on the library's ops, with the weights of a HF transformers
model (LlamaForCausalLM and the same block: SmolLM2, Llama 2/3, Mistral without sliding
window). transformers itself is only needed to load the model.

Per decoder layer (pre-norm):
    h = rmsnorm(x) * w_in;  q, k, v = h Wq, h Wk, h Wv;  RoPE on q, k at the token positions
    prefill: out, lse, col_scores = prefill_attention(q, k, v)   (packed varlen, causal); the
             layer's K/V go to the PrefillRecord (or straight into reserved rows of the cache)
    decode:  out = SqueezeKVCache.attend(...)  ->  decode_step_  (append, attend, evict)
    h = add_rmsnorm_cossim(x, out Wo, w_post)   # x += attention, the norm of the MLP, and the
                                                # layer's similarity cos(x_in, x_mid) summed
    x = x + down(act(gate(h)) * up(h))
then logits = rmsnorm(x) * w_final Wlm.

Keys are cached after RoPE at their original positions. Positions are explicit: prefill
tokens are numbered 0..T_b-1 per prompt, and each decode step uses the cache's positions, never
a cache length (rows hold different numbers of tokens).
"""
import torch
import torch.nn.functional as F

from ..engine.cache import PrefillRecord, SqueezeKVCache
from ..engine.policies import PrefillNeeds, SequencePolicy, prefill_needs


def rms_norm(x, weight, eps):
    """Llama RMSNorm: normalised in fp32, scaled by the weight in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x, cos, sin):
    """RoPE in the rotate-half convention: x [N, heads, D], cos/sin [N, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class LlamaRunner:
    """Runs a HF Llama-family causal LM through squeeze_ops (no HF forward involved).

    The runner keeps references to the model's weights (no copy), on the model's device and
    dtype. fp32 works on CPU; on a GPU convert the model to fp16/bf16 first.
    """

    def __init__(self, model):
        self.model = model  # the transformers model whose weights it reads
        config = model.config
        rope_type = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}).get(
            "rope_type", "default")
        if "dynamic" in rope_type or rope_type == "longrope":
            raise ValueError(f"model: RoPE type {rope_type!r} depends on the sequence length, not supported")
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ValueError("model: models with a sliding attention window are not supported")
        body = model.model
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = body.layers[0].self_attn.scaling
        self.embed = body.embed_tokens.weight
        self.layers = [
            dict(
                w_in=layer.input_layernorm.weight, wq=layer.self_attn.q_proj.weight,
                wk=layer.self_attn.k_proj.weight, wv=layer.self_attn.v_proj.weight,
                bq=layer.self_attn.q_proj.bias, bk=layer.self_attn.k_proj.bias, bv=layer.self_attn.v_proj.bias,
                wo=layer.self_attn.o_proj.weight, bo=layer.self_attn.o_proj.bias,
                w_post=layer.post_attention_layernorm.weight, gate=layer.mlp.gate_proj.weight,
                up=layer.mlp.up_proj.weight, down=layer.mlp.down_proj.weight, act=layer.mlp.act_fn)
            for layer in body.layers
        ]
        self.norm = body.norm.weight
        self.lm_head = model.lm_head.weight
        self.inv_freq = body.rotary_emb.inv_freq
        self.rope_scaling = body.rotary_emb.attention_scaling

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    def _rope(self, positions):
        """cos, sin [N, D] for int positions [N] (the model's inverse frequencies)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    def _qkv(self, w, x, cos, sin):
        h = rms_norm(x, w["w_in"], self.eps)
        n = x.shape[0]
        q = F.linear(h, w["wq"], w["bq"]).view(n, self.num_heads, self.head_dim)
        k = F.linear(h, w["wk"], w["bk"]).view(n, self.num_kv_heads, self.head_dim)
        v = F.linear(h, w["wv"], w["bv"]).view(n, self.num_kv_heads, self.head_dim)
        return rotate(q, cos, sin), rotate(k, cos, sin).contiguous(), v.contiguous()

    def _project(self, w, out):
        """The attention output [N, H, D] through the layer's output projection: [N, hidden]."""
        return F.linear(out.reshape(out.shape[0], -1), w["wo"], w["bo"])

    def _finish_layer(self, w, x, attn, cu_seqlens, cos_sum):
        """Attention residual (attn: the projected attention, _project) + post-attention norm +
        similarity (one op), then the MLP."""
        h = torch.ops.squeeze.add_rmsnorm_cossim(x, attn, w["w_post"], cu_seqlens, cos_sum, self.eps)
        x += F.linear(w["act"](F.linear(h, w["gate"])) * F.linear(h, w["up"]), w["down"])

    def _logits(self, x):
        return F.linear(rms_norm(x, self.norm, self.eps), self.lm_head)

    @torch.no_grad()
    def prefill(self, prompts, needs=PrefillNeeds(), reserved=None):
        """Full-attention prefill of B prompts (1-D token id tensors, ragged lengths).

        needs: what to record besides each layer's K/V and similarity sums (PrefillNeeds;
            prefill_needs(policy, settings) gives what a cache build will read):
            score_queries  the column scores the policy compresses by (-1 none, 0 H2O, W > 0
                           the last W queries);
            observe        W > 0: also the column scores of the last W queries (the op's own
                           scores when they are exactly those, else recomputed from its lse,
                           signals.observed_attention);
            perturb        policies whose residual perturbation over the last `observe` queries
                           is recorded (signals.attention_perturbation; h2o reads this
                           prefill's scores).
        reserved: a Reservation of a SqueezeKVCache (SqueezeKVCache.reserve) for these prompts:
            each layer's K/V is compressed into its rows as soon as the layer's attention has
            run, so the prefill holds one layer's prompt K/V at a time; admit the record into
            that cache.
        Returns (record, logits): the PrefillRecord for SqueezeKVCache.admit / build and the
        logits [B, V] of each prompt's last token (the prediction of its first new token).
        """
        if not isinstance(needs, PrefillNeeds):
            raise TypeError(f"needs: expected a PrefillNeeds (prefill_needs(policy, settings)), got "
                            f"{type(needs).__name__}")
        needs.check()
        lens = [len(p) for p in prompts]
        record = PrefillRecord.start(lens, self.num_layers, self.device, needs, reserved)
        ids = torch.cat([torch.as_tensor(p, device=self.device) for p in prompts]).long()
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        cos, sin = self._rope(positions)
        cu = record.cu_seqlens
        x = F.embedding(ids, self.embed)
        for layer, w in enumerate(self.layers):
            q, k, v = self._qkv(w, x, cos, sin)
            out, lse, scores = record.attend(q, k, v, self.scale)
            attn = self._project(w, out)
            if needs.perturb:
                record.add_perturbation(q, k, v, lse, scores, w["wo"], x + attn, self.scale)
            self._finish_layer(w, x, attn, cu, record.cos_sum[layer])
        return record, self._logits(x[cu[1:].long() - 1])

    @torch.no_grad()
    def decode(self, cache, tokens):
        """One decode step: tokens int [W] (W >= cache.batch; the rows past the batch are padding
        rows, e.g. of a CUDA graph captured at W) at the cache's positions -> logits [W, V].
        Mutates the cache (every layer's decode_step_, then positions += 1). No host
        synchronisation; a sequence past its max_new_tokens is refused (cache.begin_step)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
            raise ValueError(f"tokens: expected a 1-d integer tensor, got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.device != self.device:
            raise ValueError(f"tokens: expected device {self.device} (that of the model), got {tokens.device}")
        if tokens.shape[0] < cache.batch:
            raise ValueError(f"tokens: expected one per active sequence ({cache.batch}) or more, got {tokens.shape[0]}")
        cache.begin_step(tokens.shape[0])
        logits = self.decode_rows(cache, tokens)
        cache.end_step()
        return logits

    def decode_rows(self, cache, tokens):
        """The device work of decode over rows 0 .. W-1 of the cache (W = tokens.shape[0]): what
        a CUDA graph captures (DecodeGraphs); decode wraps it in the cache's host checks."""
        width = tokens.shape[0]
        cos, sin = self._rope(cache.step_positions(width))
        x = F.embedding(tokens.long(), self.embed)
        # One token per sequence; the decode's similarity sums are scratch (the plan is fixed).
        cu = torch.arange(x.shape[0] + 1, dtype=torch.int32, device=self.device)
        cos_scratch = torch.zeros(x.shape[0], dtype=torch.float32, device=self.device)
        for layer, w in enumerate(self.layers):
            q, k, v = self._qkv(w, x, cos, sin)
            out = cache.attend(layer, q.contiguous(), k, v, self.scale)
            self._finish_layer(w, x, self._project(w, out), cu, cos_scratch)
        cache.advance(width)
        return self._logits(x)

    def new_cache(self, prompts, policy, settings, max_new_tokens, page_size=16):
        """A cache for these prompts alone, its pool sized to their prefill's peak (the rows at
        their staging budgets)."""
        return SqueezeKVCache.for_prompts([len(p) for p in prompts], settings, max_new_tokens, policy,
                                          self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device,
                                          page_size)

    @torch.no_grad()
    def start(self, prompts, policy, settings, max_new_tokens, cache=None):
        """Prefill, plan and admit B prompts with a bounded prefill peak: their rows are
        reserved first and each layer compressed into them as its attention runs. cache: the
        SqueezeKVCache to admit into (default: new_cache for these prompts alone).
        Returns (cache, ids, logits [B, V] of each prompt's last token)."""
        if not isinstance(policy, SequencePolicy):
            raise TypeError(f"policy: expected a SequencePolicy, got {type(policy).__name__}")
        cache = self.new_cache(prompts, policy, settings, max_new_tokens) if cache is None else cache
        reserved = cache.reserve([len(p) for p in prompts], settings, max_new_tokens)
        try:
            record, logits = self.prefill(prompts, prefill_needs(policy, settings), reserved)
            ids = cache.admit(record, settings, max_new_tokens)
        except BaseException:
            reserved.release()
            raise
        return cache, ids, logits

    @torch.no_grad()
    def generate(self, prompts, policy, settings, max_new_tokens):
        """Greedy decoding of max_new_tokens per prompt through a squeezed cache: start (the
        first token comes from the prefill, so max_new_tokens - 1 decode steps are admitted),
        then greedy. Returns (tokens int64 [B, max_new_tokens], cache)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        cache, _, logits = self.start(prompts, policy, settings, max(max_new_tokens - 1, 0))
        return self.greedy(cache, logits, max_new_tokens), cache

    @torch.no_grad()
    def greedy(self, cache, first_logits, max_new_tokens):
        """Greedy continuation from an admitted cache: first_logits [B, V] from the prefill.
        Takes max_new_tokens - 1 decode steps. Returns tokens int64 [B, max_new_tokens]."""
        out = [first_logits.argmax(-1)]
        for _ in range(max_new_tokens - 1):
            out.append(self.decode(cache, out[-1]).argmax(-1))
        return torch.stack(out, dim=1)[:, :max_new_tokens]

    @torch.no_grad()
    def score(self, cache, first_logits, targets, on_step=None):
        """Teacher-forced scoring of targets int [B, G] after the prompts of `cache`.

        first_logits [B, V] are the prefill's last-token logits (forked like the cache);
        on_step(i) is called after step i (progress display).
        Returns (nll fp32 [B, G], top1 int64 [B, G]): each target's negative log-likelihood
        and the model's greedy prediction at that step.
        """
        logits = first_logits
        nll, top1 = [], []
        for i in range(targets.shape[1]):
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll.append(-logp.gather(1, targets[:, i : i + 1].long())[:, 0])
            top1.append(logits.argmax(-1))
            if i + 1 < targets.shape[1]:
                logits = self.decode(cache, targets[:, i])
            if on_step is not None:
                on_step(i)
        return torch.stack(nll, dim=1), torch.stack(top1, dim=1)
