"""transformers' native GLM (``GlmForCausalLM``, model_type "glm") over the same weights.

Used as an independent reference (tests) and as the reference-style baseline (bench: HF
``generate`` plus a streamer thread, batch 1, as the original server runs). The transformers
module is built on the meta device and its parameters are views of ours (the fused qkv tensor
split into q/k/v rows; ``gate_up_proj`` is the checkpoint's ``dense_h_to_4h`` as is), so it costs
no extra weight memory.
"""

from __future__ import annotations

import torch

from glm4voice.llm.config import DEFAULT_SEQ_LENGTH
from glm4voice.llm.model import Block, GLMModel


def transformers_glm_config(model: GLMModel, **overrides):
    from transformers import GlmConfig

    c = model.config
    return GlmConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.seq_length or DEFAULT_SEQ_LENGTH,
        rms_norm_eps=c.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base, "partial_rotary_factor": 0.5},
        attention_bias=c.qkv_bias,
        pad_token_id=c.pad_token_id,
        eos_token_id=list(c.eos_token_ids) or None,
        tie_word_embeddings=False,
        **overrides,
    )


def to_transformers_glm(model: GLMModel, attn_implementation: str = "sdpa"):
    """A ``GlmForCausalLM`` sharing ``model``'s (floating point) weights."""
    from transformers import GlmForCausalLM

    from glm4voice.llm.quant import is_quantized

    if is_quantized(model):
        raise ValueError("the transformers view needs floating point weights, not quantized ones")
    c = model.config
    hf_config = transformers_glm_config(model)
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        hf = GlmForCausalLM(hf_config)
    q, kv = c.q_size, c.kv_size
    state = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.final_norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.layers):
        assert isinstance(block, Block)  # GLMModel.layers holds Blocks only
        prefix = f"model.layers.{i}."
        w = block.qkv.weight
        state |= {
            prefix + "input_layernorm.weight": block.attn_norm.weight,
            prefix + "self_attn.q_proj.weight": w[:q],
            prefix + "self_attn.k_proj.weight": w[q : q + kv],
            prefix + "self_attn.v_proj.weight": w[q + kv :],
            prefix + "self_attn.o_proj.weight": block.out.weight,
            prefix + "post_attention_layernorm.weight": block.mlp_norm.weight,
            prefix + "mlp.gate_up_proj.weight": block.gate_up.weight,
            prefix + "mlp.down_proj.weight": block.down.weight,
        }
        if block.qkv.bias is not None:
            b = block.qkv.bias
            state |= {
                prefix + "self_attn.q_proj.bias": b[:q],
                prefix + "self_attn.k_proj.bias": b[q : q + kv],
                prefix + "self_attn.v_proj.bias": b[q + kv :],
            }
    hf.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers (rotary frequencies) are still on the meta device: rebuild them
    rotary = type(hf.model.rotary_emb)(hf_config)
    hf.model.rotary_emb = rotary.to(model.device)
    hf.generation_config.pad_token_id = c.pad_token_id
    return hf.eval()


def queue_streamer():
    """A ``generate(streamer=...)`` object that puts each generated id on its ``queue`` (``None`` at
    the end), skipping the prompt ``generate`` puts first: how the original model server streams
    (the reference-style baselines of bench/ use it)."""
    import queue

    from transformers.generation.streamers import BaseStreamer

    class QueueStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.queue: queue.Queue[int | None] = queue.Queue()
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.queue.put(token)

        def end(self):
            self.queue.put(None)

    return QueueStreamer()
