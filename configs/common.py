"""Fields every stage shares: where, how many devices, how to shard, checkpoint and log.

Every ConfigDict here is locked: an override of a key that does not exist fails at start.
"""

import ml_collections

STAGES = ("sft", "policy_init", "feedback", "rm", "ppo", "eval")


def common(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.workdir = "./workdir"
    c.seed = 0
    # '' = random init; an HF directory; a stage directory (its latest checkpoint); a step dir.
    c.init = ""
    # Mesh axis sizes; -1 takes the devices the others leave.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # (logical_name, mesh_axes) pairs that replace entries of parallel/sharding.py DEFAULT_RULES,
    # e.g. --config.rules='(("embed", None),)'.
    c.rules = ()
    c.max_replicated_share = 0.02
    # Multi-process start (GPU clusters); TPU pods and SLURM are detected, one process needs none.
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=-1, process_id=-1, local_device_ids=""))
    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3, async_save=True))
    c.log = ml_collections.ConfigDict(dict(every=10, eval_every=0, tensorboard=True,
                                           progress=True))
    return c


def adamw(lr: float, schedule: str, grad_clip: float, **warmup) -> ml_collections.ConfigDict:
    """`config.optim` of a stage (engine/optim.py; PPO's ppo_optimizer): AdamW, no weight decay.

    `warmup`: warmup_steps (-1: from warmup_ratio) and warmup_ratio for the step-based stages,
    warmup_iterations for PPO. `schedule`: 'cosine' (to lr * end_factor) or 'constant'.
    """
    return ml_collections.ConfigDict(dict(
        lr=lr, **warmup, schedule=schedule, end_factor=0.0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.0, grad_clip=grad_clip))


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.lock()
    return config
