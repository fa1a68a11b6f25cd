"""PPO's four models as ONE variables tree over at most two frozen bases (docs/method.md stage 5).

    {'policy':    {'params': policy base (frozen), 'lora': policy adapter (trainable)},
     'reference': {'lora': the initial policy adapter (frozen)},
     'critic':    {'params': RM / value base (frozen)}         -- absent when it is the policy's
     'rm':        {'lora': RM adapter (frozen), 'head': reward head (frozen)},
     'value':     {'lora': value adapter (trainable, starts as a copy of the RM adapter),
                   'head': value head (trainable, zero-initialised)}}

The reference is the policy base with the initial adapter: never a second copy of the base. The
RM and the value model share one frozen backbone; on the tiny world that backbone may be the
policy's own base (`critic_shares_base`), docs/method.md's 7B policy / 13B critic split is the real
preset's. With `full_finetune` the policy base itself is trained: then, and only then, the
reference holds a frozen copy of the base ('reference/params').

Every forward is a pure function of that tree; the trainable/frozen split is a regex over its
paths (engine/optim.py), so the engine's state planning, sharding and checkpoints apply as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from rlaif_jax.models.heads import RewardHead, ValueHead, mean_token_logprob
from rlaif_jax.models.llama import Llama
from rlaif_jax.ppo.rl_math import token_entropy


@dataclasses.dataclass(frozen=True)
class ActorCritic:
    """The models of one PPO run. `policy` and `critic` are Llama or VideoLLM modules (the
    critic's LoRA rank is the RM adapter's; 0 for an RM without adapter, which then gets a
    fresh value adapter from `value_lora_model`)."""

    policy: Any
    critic: Any
    critic_shares_base: bool = True
    full_finetune: bool = False
    rm_has_adapter: bool = True
    # The RM's likelihood term (rm/model.py): its score adds this times the response's mean
    # log-probability per token under the RM's own LM. From the RM checkpoint's config.
    rm_likelihood_weight: float = 0.0

    @property
    def is_video(self) -> bool:
        return not isinstance(self.policy, Llama)

    def trainable_regex(self) -> str:
        policy = ("policy/params/(?!vision/|projector/).*" if self.full_finetune
                  else "policy/lora/.*")
        return f"{policy}|value/.*"

    # -----------------------------------------------------------------------------------------
    # Initialisation (traced by plan_state; real weights are laid over it by the stage)

    def init_variables(self, rng: jax.Array) -> dict:
        """Boxed variables of the whole tree, for shapes and logical axes."""
        policy_rng, critic_rng, head_rng = jax.random.split(rng, 3)
        policy = _init_backbone(self.policy, policy_rng)
        tree = {"policy": {"params": policy["params"]}}
        if self.full_finetune:
            tree["reference"] = {"params": policy["params"]}
        else:
            tree["policy"]["lora"] = policy["lora"]
            tree["reference"] = {"lora": policy["lora"]}
        critic = policy if self.critic_shares_base else _init_backbone(self.critic, critic_rng)
        if not self.critic_shares_base:
            tree["critic"] = {"params": critic["params"]}
        hidden = jnp.zeros((1, 1, _hidden_size(self.critic)), jnp.float32)
        tree["rm"] = {"head": RewardHead().init(head_rng, hidden, jnp.ones((1, 1)))["params"]}
        tree["value"] = {"head": ValueHead().init(head_rng, hidden)["params"]}
        if "lora" in critic:
            if self.rm_has_adapter:
                tree["rm"]["lora"] = critic["lora"]
            tree["value"]["lora"] = critic["lora"]
        return tree

    # -----------------------------------------------------------------------------------------
    # Variable views

    def policy_variables(self, tree: dict) -> dict:
        return dict(tree["policy"])

    def reference_variables(self, tree: dict) -> dict:
        if self.full_finetune:
            return {"params": tree["reference"]["params"]}
        return {"params": tree["policy"]["params"], "lora": tree["reference"]["lora"]}

    def _critic_params(self, tree: dict):
        if not self.critic_shares_base:
            return tree["critic"]["params"]
        # A fully fine-tuned policy moves its base: the critic keeps the frozen original.
        return tree["reference" if self.full_finetune else "policy"]["params"]

    def rm_variables(self, tree: dict) -> dict:
        out = {"params": self._critic_params(tree)}
        if "lora" in tree["rm"]:
            out["lora"] = tree["rm"]["lora"]
        return out

    def value_variables(self, tree: dict) -> dict:
        out = {"params": self._critic_params(tree)}
        if "lora" in tree["value"]:
            out["lora"] = tree["value"]["lora"]
        return out

    # -----------------------------------------------------------------------------------------
    # Forward passes over (prompt, response) batches; all outputs aligned with the response

    def encode_video(self, tree: dict, frames: jax.Array, critic: bool = False) -> jax.Array:
        """Video tokens of the policy's (or the critic's) vision tower and projector: computed
        once per rollout batch and passed to every later pass (both towers are frozen)."""
        model = self.critic if critic else self.policy
        params = self._critic_params(tree) if critic else tree["policy"]["params"]
        return model.apply({"params": params}, frames, method="encode_video")

    def policy_outputs(self, tree: dict, batch: dict, reference: bool = False,
                       temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
        """(log-probs of the response tokens [B, T], entropy of each position [B, T]) under
        log_softmax(logits / temperature), the sampler's convention."""
        variables = self.reference_variables(tree) if reference else self.policy_variables(tree)
        ids, mask, prompt_slots = _sequence(batch)
        hidden = _hidden(self.policy, variables, ids, mask, batch.get("video_tokens"),
                         batch.get("has_video"))
        new = batch["response"].shape[1]
        # The hidden state at index s predicts the token at s + 1.
        hidden = hidden[:, prompt_slots - 1:prompt_slots - 1 + new]
        logits = self.policy.apply(variables, hidden, method="logits").astype(jnp.float32)
        logits = logits / (temperature or 1.0)
        logp = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(logp, batch["response"][..., None], axis=-1)[..., 0]
        return chosen, token_entropy(logits)

    def values(self, tree: dict, batch: dict) -> jax.Array:
        """Value of each response token [B, T], read from the hidden state before it."""
        variables = self.value_variables(tree)
        ids, mask, prompt_slots = _sequence(batch)
        hidden = _hidden(self.critic, variables, ids, mask, _critic_video(batch, self),
                         batch.get("has_video"))
        new = batch["response"].shape[1]
        hidden = hidden[:, prompt_slots - 1:prompt_slots - 1 + new]
        return ValueHead().apply({"params": tree["value"]["head"]}, hidden)

    def rm_scores(self, tree: dict, batch: dict, rm_suffix: jax.Array) -> jax.Array:
        """RM score [B] of prompt + response (pads dropped) + the evaluation prompt's tokens
        `rm_suffix` [S], read at the last token. Pads between the parts are masked and
        positions come from the mask, which is the same as removing them."""
        ids, mask, _ = _sequence(batch)
        suffix = jnp.broadcast_to(jnp.asarray(rm_suffix, ids.dtype), (ids.shape[0], len(rm_suffix)))
        ids = jnp.concatenate([ids, suffix], axis=1)
        mask = jnp.concatenate([mask, jnp.ones_like(suffix)], axis=1)
        variables = self.rm_variables(tree)
        hidden = _hidden(self.critic, variables, ids, mask, _critic_video(batch, self),
                         batch.get("has_video"))
        score = RewardHead().apply({"params": tree["rm"]["head"]}, hidden, mask)
        if not self.rm_likelihood_weight:
            return score
        # As the RM stage scores a row: the response's tokens (its EOS included), each read
        # from the position before it (the prompt's last slot reads the first).
        prompt_slots = batch["prompt_ids"].shape[1]
        span = slice(prompt_slots - 1, prompt_slots + batch["response"].shape[1])
        logits = self.critic.apply(variables, hidden[:, span], method="logits")
        response_mask = jnp.pad(batch["mask"], ((0, 0), (1, 0)))
        return score + self.rm_likelihood_weight * mean_token_logprob(
            logits, ids[:, span], response_mask)


def _critic_video(batch: dict, models: ActorCritic) -> Optional[jax.Array]:
    if models.critic_shares_base:
        return batch.get("video_tokens")
    return batch.get("critic_video_tokens")


def _sequence(batch: dict) -> tuple[jax.Array, jax.Array, int]:
    """prompt (left-padded) + response (right-padded): ids, attention mask, prompt slots."""
    ids = jnp.concatenate([batch["prompt_ids"], batch["response"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["mask"]], axis=1)
    return ids, mask.astype(jnp.int32), batch["prompt_ids"].shape[1]


def _hidden(model, variables, ids, mask, video_tokens, has_video) -> jax.Array:
    """Final hidden states [B, L, H] aligned with ids (the video LLM gathers them back)."""
    if isinstance(model, Llama):
        return model.apply(variables, input_ids=ids, attention_mask=mask,
                           compute_logits=False).last_hidden_state
    return model.apply(variables, ids, mask, has_video=has_video, video_tokens=video_tokens,
                       compute_logits=False).last_hidden_state


def _init_backbone(model, rng) -> dict:
    ids = jnp.zeros((1, 4), jnp.int32)
    if isinstance(model, Llama):
        return dict(model.init(rng, ids))
    return dict(model.init(rng, ids, jnp.ones((1, 4), jnp.int32)))


def _hidden_size(model) -> int:
    config = model.config
    return (config.llm if hasattr(config, "llm") else config).hidden_size

