"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) through accelerate.

Launch as any accelerate FSDP job, with accelerate's own config file (the workbench adds no
setting of its own, so the file a user already has for ``accelerate launch`` applies)::

    accelerate launch --config_file configs/accelerate/fsdp.yaml -m rlhf_workbench.cli run \\
        --config configs/gsm8k.yaml --out runs/fsdp

What happens under FSDP (``accelerator.distributed_type == DistributedType.FSDP``):

- the policy (and PPO's critic) are sharded by ``accelerator.prepare`` with the plugin's wrap
  policy (one FSDP unit per decoder layer, then the root); the frozen reference is sharded the
  same way (:func:`shard_frozen`), so no process holds a full copy of any of the three between
  rollouts. (A LoRA policy's reference is the policy itself with adapters disabled, as
  without sharding.)
- rollout and evaluation generate with a plain, unsharded copy: :func:`full_copy` gathers the
  full parameters (``get_model_state_dict(full_state_dict=True)``, a collective every process
  joins) into a copy of the module built on the meta device beforehand (:class:`Gatherer`), and
  the copy is dropped right after. Rollout gathers on every process (each generates its share of
  the prompts); evaluation and checkpoints gather onto the main process only
  (``cpu_offload=True``: the other processes receive nothing). Generating shard-aware (FSDP's
  per-layer all-gathers in every decoding step) would cost one collective per layer per token and
  would deadlock with evaluation running on the main process alone, so the copy is the design.
  Peak memory of a rollout is therefore the shards plus one full copy of the policy.
- checkpoints are the full state dict saved with ``save_pretrained`` on the main process: the
  plain Hugging Face layout, loadable by ``AutoModelForCausalLM.from_pretrained`` (LoRA: the
  adapter layout, as without sharding). The optimizer state is sharded and is not written
  (``optimizer.pt`` is absent): a resumed FSDP run restarts AdamW's moments.

On the CPU accelerate never enables FSDP: with ``fsdp`` in its config it silently runs DDP over
gloo (``AcceleratorState`` sets FSDP only for GPU-like devices). :func:`make_accelerator` then
switches the state to FSDP itself, and FSDP2 runs on CPU tensors over gloo (torch 2.13,
accelerate 1.15: ``tests/test_fsdp.py``). FSDP1 (``fsdp_version: 1``) is refused: untested here.
DeepSpeed ZeRO-3 is not supported (the ``deepspeed`` package is not installed in this
environment, and nothing here was tested with it).
"""

from __future__ import annotations

import copy
import gc
import os
import sys
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from rlhf_workbench.model.loading import PolicyPair


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` asked for FSDP (``ACCELERATE_USE_FSDP=true``, set by
    ``--use_fsdp`` or a config file with ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


class ShardedAccelerator(Accelerator):
    """``Accelerator`` whose ``clip_grad_norm_`` accepts the parameters of several FSDP2 modules.

    accelerate 1.15 looks the parameters up among its prepared models with ``parameters ==
    list(model.parameters())``, which raises "Boolean value of Tensor with more than one value is
    ambiguous" as soon as two prepared models have as many parameter tensors (a second policy, an
    untied policy beside its critic). Under FSDP2 this skips the lookup and goes to accelerate's
    DTensor-aware clipping, where the lookup ends anyway: the global norm over all shards (and
    meshes), then every gradient scaled by ``min(1, max_norm / norm)``.
    """

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """Clip the gradients of ``parameters`` to global norm ``max_norm``; returns the pre-clip norm."""
        if self.is_fsdp2:
            self.unscale_gradients()
            return self._clip_grad_norm_dtensor_aware(list(parameters), max_norm, norm_type=norm_type)
        return super().clip_grad_norm_(parameters, max_norm, norm_type=norm_type)


def make_accelerator(**kwargs) -> Accelerator:
    """The run's ``Accelerator``: on the CPU when there is no GPU, with FSDP2 when launched for FSDP.

    Args:
        kwargs: passed to ``Accelerator`` (``mixed_precision``, ``kwargs_handlers``...).

    Raises:
        ValueError: FSDP was requested with ``fsdp_version`` 1 (only FSDP2 is supported).
    """
    cpu = not torch.cuda.is_available()
    if not fsdp_requested():
        return Accelerator(cpu=cpu, **kwargs)
    plugin = FullyShardedDataParallelPlugin()  # reads accelerate's FSDP_* environment variables
    if plugin.fsdp_version != 2:
        raise ValueError(f"accelerate config: fsdp_version {plugin.fsdp_version} is not supported; "
                         "set fsdp_version: 2 (FSDP2, torch.distributed.fsdp.fully_shard)")
    accelerator = ShardedAccelerator(cpu=cpu, fsdp_plugin=plugin, **kwargs)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:  # accelerate fell back to DDP on the CPU
        from accelerate.state import PartialState

        # both shared states: every AcceleratorState() call copies PartialState's fields over its own
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if is_fsdp(accelerator) and accelerator.is_main_process:
        print(f"sharding: FSDP{plugin.fsdp_version} over {accelerator.num_processes} processes "
              f"({accelerator.device.type}, {torch.distributed.get_backend()})", file=sys.stderr, flush=True)
    return accelerator


def is_fsdp(accelerator) -> bool:
    """Whether ``accelerator`` shards its modules with FSDP."""
    return accelerator is not None and accelerator.distributed_type == DistributedType.FSDP


def is_sharded(module) -> bool:
    """Whether ``module`` is an FSDP2 module (its forward may all-gather: every process must call it)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_frozen(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen module (the reference) as ``accelerator.prepare`` shards the policy: the same
    plugin (wrap policy, resharding, mixed precision), no optimizer. In place; returns ``module``."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    module.requires_grad_(False).eval()
    return fsdp2_prepare_model(accelerator, module)


def meta_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters are on the meta device (no memory); buffers,
    config and hooks-free structure kept. Tied parameters stay tied. Make it before sharding."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _tied_groups(module: torch.nn.Module) -> list[list[str]]:
    by_param: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def _set_param(module: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, param)


def full_copy(sharded: torch.nn.Module, skeleton: torch.nn.Module, everywhere: bool) -> torch.nn.Module | None:
    """A plain (unsharded) copy of ``sharded``'s current full parameters, in eval mode, frozen.

    A collective: every process must call it. ``everywhere``: every process gets the copy;
    otherwise the main process only (the others get None and receive no parameters).

    Args:
        sharded: the FSDP2 module (its parameters are DTensor shards).
        skeleton: :func:`meta_skeleton` of the module before it was sharded (same names).

    Raises:
        RuntimeError: the gathered state dict does not match the skeleton's names.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    if not everywhere and dist.get_rank() != 0:
        return None
    plain = copy.deepcopy(skeleton)
    plain.load_state_dict(state, assign=True)
    del state
    for names in _tied_groups(skeleton):  # assign=True replaced each name's parameter separately
        shared = plain.get_parameter(names[0])
        for name in names[1:]:
            _set_param(plain, name, shared)
    return plain.requires_grad_(False).eval()


class Gatherer:
    """Plain copies of the sharded policy, reference and critic for generation, evaluation and
    checkpoints; without FSDP it hands back the modules themselves (no copy, no collective).

    Build it before ``accelerator.prepare`` (it keeps meta-device skeletons of the modules as they
    were loaded) and prepare through :meth:`prepare`, which also shards the reference.
    """

    def __init__(self, accelerator, pair, critic: torch.nn.Module | None = None):
        self.accelerator, self.pair, self.critic = accelerator, pair, critic
        self.active = is_fsdp(accelerator)
        self.skeletons = {}
        if self.active:
            self.skeletons["policy"] = meta_skeleton(pair.policy)
            if pair.reference is not None:
                self.skeletons["reference"] = meta_skeleton(pair.reference)
            if critic is not None:
                self.skeletons["critic"] = meta_skeleton(critic)

    def prepare(self, optimizer):
        """``accelerator.prepare`` the policy (and critic) with ``optimizer``, then shard the
        reference (FSDP); returns ``(train_module, critic, optimizer)`` (``critic`` None without one).

        accelerate's FSDP2 prepares one model per call ("Only one model is supported when using
        FSDP2"), so under FSDP a PPO optimizer built over both modules (one parameter group each,
        :func:`rlhf_workbench.train.ppo.make_optimizer`) is split into one optimizer per group with the
        same settings, each prepared with its module, and stepped together (:class:`JointOptimizer`).
        """
        acc, policy, critic = self.accelerator, self.pair.policy, self.critic
        if critic is None:
            train_module, optimizer = acc.prepare(policy, optimizer)
        elif not self.active:
            train_module, critic, optimizer = acc.prepare(policy, critic, optimizer)
        else:
            if len(optimizer.param_groups) != 2:
                raise ValueError(f"FSDP with a critic needs the optimizer's 2 parameter groups (policy, critic), "
                                 f"got {len(optimizer.param_groups)}")
            split = [type(optimizer)([dict(group)]) for group in optimizer.param_groups]  # a group keeps every setting
            train_module, policy_opt = acc.prepare(policy, split[0])
            critic, critic_opt = acc.prepare(critic, split[1])
            optimizer = JointOptimizer([policy_opt, critic_opt])
        self.critic = critic
        self.shard_reference()
        return train_module, critic, optimizer

    def shard_reference(self) -> None:
        """Shard the frozen reference like the policy (FSDP only; LoRA has no separate reference)."""
        if self.active and self.pair.reference is not None:
            self.pair.reference = shard_frozen(self.accelerator, self.pair.reference)

    def for_main(self, reference: bool = True, critic: bool = True):
        """``(pair, critic)`` for evaluation and checkpoints on the main process: plain copies of
        the policy (the reference too when ``reference``, else None) and of the critic (when
        ``critic`` and there is one) on the main process, ``(None, None)`` on the others. A
        collective under FSDP (every process must call it); without FSDP ``(self.pair,
        self.critic)`` themselves, on every process. Drop the copies (rebind the names) when done."""
        if not self.active:
            return self.pair, self.critic
        policy = full_copy(self.pair.train_module, self.skeletons["policy"], everywhere=False)
        ref = None
        if reference and self.pair.reference is not None:
            ref = full_copy(self.pair.reference, self.skeletons["reference"], everywhere=False)
        value = None
        if critic and self.critic is not None:
            value = full_copy(self.critic, self.skeletons["critic"], everywhere=False)
        if policy is None:
            return None, None
        return PolicyPair(policy=policy, reference=ref, tokenizer=self.pair.tokenizer), value

    @contextmanager
    def generating(self, engine):
        """Context under which ``engine`` (an :class:`~rlhf_workbench.model.rollout.HFEngine`) samples
        from a plain copy of the current policy on every process (FSDP; a collective on entry),
        dropped on exit; without FSDP nothing changes."""
        if not self.active:
            yield engine
            return
        sharded = engine.model
        engine.model = full_copy(self.pair.train_module, self.skeletons["policy"], everywhere=True)
        try:
            yield engine
        finally:
            engine.model = sharded
            gc.collect()


class JointOptimizer:
    """Several (prepared) optimizers stepped as one: what the PPO update calls (``step``,
    ``zero_grad``, ``param_groups``, ``state_dict``) on the policy's and critic's optimizers
    under FSDP (see :meth:`Gatherer.prepare`)."""

    def __init__(self, optimizers: list):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        """Every optimizer's parameter groups, in order (policy first)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, closure=None) -> None:
        """Step every optimizer (no closure support)."""
        if closure is not None:
            raise ValueError("JointOptimizer.step takes no closure")
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (by default drop) every optimizer's gradients."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """``{"optimizers": [state_dict, ...]}`` (each this process's shard under FSDP)."""
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}
