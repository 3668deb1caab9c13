"""llmcore.patch(model): make an existing model run llmcore kernels, in place.

One generic mechanism, by module type, plus small tables of known Hugging Face classes:

- norm: `torch.nn.LayerNorm` / `torch.nn.RMSNorm` modules become their llmcore subclasses (the
  object's class is switched: same parameters, no copy, same state_dict keys); Hugging Face RMSNorm
  classes of the `weight * x / rms(x)` kind (`_HF_RMS_NORMS`) are replaced by an llmcore RMSNorm
  holding the very same weight Parameter.
- activation: `torch.nn.GELU` modules become llmcore.nn.GELU (class switch); Hugging Face GELU
  modules of `_HF_GELUS` (BERT's exact GELU, GPT-2's "gelu_new" tanh formula, ...) are replaced
  by an llmcore.nn.GELU of the same form: one kernel each way where GPT-2's eager formula runs
  ~8 elementwise kernels forward and keeps its intermediates for the backward.
- attention: for Hugging Face models, an "llmcore" attention function (and its mask builder,
  HF's boolean SDPA mask: padding, causal, sliding windows) is registered with transformers'
  AttentionInterface and the model switched to it. Plain torch models have no such hook.
- loss: Hugging Face models get `loss_function` = llmcore cross-entropy; the causal LMs of
  `_FUSED_CAUSAL_LM` (logits = lm_head(h), nothing else) compute the loss with
  `linear_cross_entropy` from the hidden states when labels are given, so the (tokens, V) logits
  are never built (`logits` is None in that output). Where HF's loss upcasts half-precision
  logits to float32, that copy is the loss's own: the Triton backend writes the gradient into
  it (`inplace_backward`), one (tokens, V) float32 buffer fewer. `torch.nn.CrossEntropyLoss`
  modules of any model become llmcore.nn.CrossEntropyLoss; the heads of `_INLINE_CE_HEADS`
  (BERT's and RoBERTa's MLM and token classification), whose forward creates one on the fly,
  get their loss from llmcore over their logits.

transformers is imported lazily: `import llmcore` never imports it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch

from llmcore import nn as lnn
from llmcore.ops.attention import attention as _attention
from llmcore.ops.cross_entropy import cross_entropy, linear_cross_entropy

# HF RMSNorm classes computing weight * (x / sqrt(mean(x^2) + variance_epsilon)) (not Gemma's
# (1 + weight)): replaced by llmcore.nn.RMSNorm.
_HF_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm",
                 "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm", "GraniteRMSNorm")
# HF GELU modules -> the `approximate` of the F.gelu they compute (FastGELU writes sqrt(2/pi)
# to 10 digits: the same function within float32 rounding).
_HF_GELUS = {"GELUActivation": "none", "NewGELUActivation": "tanh", "GELUTanh": "tanh",
             "PytorchGELUTanh": "tanh", "FastGELUActivation": "tanh"}
# HF causal LMs whose logits are exactly lm_head(last_hidden_state): fused loss allowed.
_FUSED_CAUSAL_LM = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                    "Qwen3ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel")
# HF heads whose forward creates torch's CrossEntropyLoss on the fly (no module there for
# _patch_loss_modules to switch) over (…, n_classes) logits: class -> the config field holding
# n_classes. Their loss is computed by llmcore from the logits instead (_logits_loss).
_INLINE_CE_HEADS = {"BertForMaskedLM": "vocab_size", "RobertaForMaskedLM": "vocab_size",
                    "BertForTokenClassification": "num_labels",
                    "RobertaForTokenClassification": "num_labels"}


def patch(model, *, norm=True, activation=True, attention=True, loss=True, backend="auto"):
    """Swaps llmcore kernels into `model` in place and returns it; outputs, gradients and
    state_dict keys are unchanged (within the kernels' tolerance). `backend` is passed to every
    llmcore op the model then calls."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hf = _is_hf(model)
    if norm:
        _patch_norms(model, backend)
    if activation:
        _patch_activations(model, backend)
    if attention and hf:
        _patch_hf_attention(model, backend)
    if loss:
        _patch_loss_modules(model, backend)
        if hf:
            _patch_hf_loss(model, backend)
    return model


def _is_hf(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


# ----------------------------------------------------------------------------- norms, activations

def _swap_children(model, backend, subclasses, replace):
    """Every child module whose type is a key of `subclasses` has its class switched to the
    llmcore subclass it maps to (the same object: parameters and state_dict keys unchanged);
    every other child for which replace(child) returns a module is replaced by it, in the
    child's train/eval mode."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            sub = subclasses.get(type(child))
            if sub is not None:
                child.__class__ = sub
                child.backend = backend
                continue
            new = replace(child)
            if new is not None:
                new.train(child.training)
                setattr(parent, name, new)


def _patch_norms(model, backend):
    def hf_rms_norm(child):
        if type(child).__name__ not in _HF_RMS_NORMS:
            return None
        weight = child.weight
        new = lnn.RMSNorm(weight.shape[0], eps=float(child.variance_epsilon), backend=backend,
                          device="meta")
        new.weight = weight                        # the same Parameter: no copy, same key
        return new
    _swap_children(model, backend, {torch.nn.LayerNorm: lnn.LayerNorm,
                                    torch.nn.RMSNorm: lnn.RMSNorm}, hf_rms_norm)


def _patch_activations(model, backend):
    def hf_gelu(child):
        approximate = _HF_GELUS.get(type(child).__name__)
        return None if approximate is None else lnn.GELU(approximate, backend=backend)
    _swap_children(model, backend, {torch.nn.GELU: lnn.GELU}, hf_gelu)


# ----------------------------------------------------------------------------- attention

def _hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  is_causal=None, *, backend="auto", **kwargs):
    """transformers' attention-function contract: query (B, Hq, Nq, D), key/value
    (B, Hkv, Nk, D), attention_mask a boolean (B, 1, Nq, Nk) mask (True = attend) or None ->
    ((B, Nq, Hq, D), None)."""
    if kwargs.get("output_attentions"):
        raise ValueError("the llmcore attention does not return attention probabilities; use "
                         "attn_implementation='eager' for output_attentions=True")
    nq, nk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As HF's SDPA path: with no mask, a causal model attends causally only when several queries
    # come; a single decoding query sees every cached key. Keys past Nq (a static cache's unused
    # slots) are cut so the top-left causal alignment is the right one.
    causal = bool(causal and attention_mask is None and nq > 1)
    if causal and nk > nq:
        key, value = key[:, :, :nq], value[:, :, :nq]
    out = _attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                     is_causal=causal, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
                     softcap=kwargs.get("softcap") or 0.0, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def _attention_name(backend: str) -> str:
    return "llmcore" if backend == "auto" else f"llmcore_{backend}"


def _patch_hf_attention(model, backend):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = _attention_name(backend)
    AttentionInterface.register(name, functools.partial(_hf_attention, backend=backend))
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} does not accept a custom attention function "
                           "(it does not use transformers' AttentionInterface); pass "
                           "attention=False to patch the rest")


# ----------------------------------------------------------------------------- losses

def _patch_loss_modules(model, backend):
    for m in model.modules():
        if type(m) is torch.nn.CrossEntropyLoss:
            m.__class__ = lnn.CrossEntropyLoss
            m.z_loss, m.softcap, m.backend = 0.0, None, backend


def _reduce(loss_sum_or_mean, num_items_in_batch):
    if num_items_in_batch is None:
        return loss_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum_or_mean.device)
    return loss_sum_or_mean / num_items_in_batch


def _ce(logits, labels, num_items_in_batch, ignore_index, backend, private=False):
    """HF's fixed_cross_entropy on llmcore: mean, or sum / num_items_in_batch when the Trainer
    accumulates gradients over several batches. private: `logits` is a buffer of the loss's
    own (HF's float32 upcast of half-precision logits), which nothing reads after the loss, so
    a kernel backend may write the gradient into it (inplace_backward: one (tokens, V) fp32
    buffer fewer, 4 bytes per logit)."""
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = cross_entropy(logits, labels.to(logits.device), ignore_index=ignore_index,
                         reduction=reduction, inplace_backward=private, backend=backend)
    return _reduce(loss, num_items_in_batch)


def _upcast(logits, n_classes):
    """(the logits as float32 (rows, n_classes), whether that is a copy of our own): HF's
    losses upcast; the model's own logits (float32 already) are the caller's to read."""
    up = logits.float()
    return up.reshape(-1, n_classes), up is not logits


def _next_token_targets(labels, shift_labels, ignore_index):
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _hf_losses(backend):
    """llmcore versions of transformers' loss functions, by HF loss_type."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    def causal_lm(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                  shift_labels=None, **kwargs):
        target = _next_token_targets(labels, shift_labels, ignore_index)
        rows, private = _upcast(logits, vocab_size)
        return _ce(rows, target.reshape(-1), num_items_in_batch, ignore_index, backend, private)

    def masked_lm(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                  **kwargs):
        rows, private = _upcast(logits, vocab_size)
        return _ce(rows, labels.reshape(-1), num_items_in_batch, ignore_index, backend, private)

    def token_classification(logits, labels, config, **kwargs):
        rows, private = _upcast(logits, config.num_labels)
        return _ce(rows, labels.reshape(-1), kwargs.get("num_items_in_batch"),
                   kwargs.get("ignore_index", -100), backend, private)

    def sequence_classification(labels, pooled_logits, config, **kwargs):
        hf_loss = LOSS_MAPPING["ForSequenceClassification"]
        # HF settles the problem type on first use; regression / multi-label are not
        # cross-entropy and keep HF's MSE / BCE.
        if config.problem_type is None and config.num_labels > 1 \
                and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        if config.problem_type != "single_label_classification":
            return hf_loss(labels=labels, pooled_logits=pooled_logits, config=config, **kwargs)
        return _ce(pooled_logits.reshape(-1, config.num_labels), labels.reshape(-1),
                   kwargs.get("num_items_in_batch"), kwargs.get("ignore_index", -100), backend)

    return {"ForCausalLM": causal_lm, "ForMaskedLM": masked_lm,
            "ForTokenClassification": token_classification,
            "ForSequenceClassification": sequence_classification}


def _patch_hf_loss(model, backend):
    loss_type = getattr(model, "loss_type", None)
    losses = _hf_losses(backend)
    if loss_type in losses:
        model.loss_function = losses[loss_type]
    name = type(model).__name__
    if name in _FUSED_CAUSAL_LM:
        model.forward = _forward_with_loss(model, functools.partial(_fused_causal_lm_loss,
                                                                     model, backend))
    elif name in _INLINE_CE_HEADS:
        n_classes = getattr(model.config, _INLINE_CE_HEADS[name])
        model.forward = _forward_with_loss(model, functools.partial(_logits_loss, backend,
                                                                     n_classes))


def _forward_with_loss(model, loss_forward):
    """model.forward, except that a call with labels returns loss_forward(original forward,
    the other arguments by name, labels): the model's own forward without labels."""
    original = model.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        kwargs = _by_name(signature, args, kwargs)
        labels = kwargs.pop("labels", None)
        if labels is None:
            return original(**kwargs)
        return loss_forward(original, kwargs, labels)

    return forward


def _by_name(signature, args, kwargs) -> dict:
    """Every argument of a call, by parameter name (**kwargs flattened in)."""
    bound = signature.bind(*args, **kwargs).arguments
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(p.name, {}))
    return dict(bound)


def _logits_loss(backend, n_classes, original, kwargs, labels):
    """The model's own forward without labels, then llmcore's cross-entropy over its logits,
    exactly as the HF head computes it (mean over the labels != -100); the output is the
    model's, with that loss."""
    out = original(**kwargs)
    logits = out[0] if isinstance(out, tuple) else out.logits
    loss = cross_entropy(logits.reshape(-1, n_classes), labels.to(logits.device).reshape(-1),
                         backend=backend)
    if isinstance(out, tuple):                       # return_dict=False: (loss, logits, ...)
        return (loss, *out)
    return dataclasses.replace(out, loss=loss)


def _fused_causal_lm_loss(model, backend, original, kwargs, labels):
    """base model -> hidden states -> linear_cross_entropy against lm_head's weight (no
    logits)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    out = model.base_model(**kwargs)
    h = out.last_hidden_state                                           # (B, N, E)
    head = model.get_output_embeddings()
    target = _next_token_targets(labels, shift_labels, -100).to(h.device)
    loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, target.reshape(-1),
                                head.bias, reduction="sum" if num_items is not None else "mean",
                                backend=backend)
    return CausalLMOutputWithPast(loss=_reduce(loss, num_items), logits=None,
                                  past_key_values=getattr(out, "past_key_values", None),
                                  hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))
