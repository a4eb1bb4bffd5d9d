"""Many tasks on one base model: multi-task LoRA in mixed batches, continual learning, adapter combination.

One recipe lists the tasks (``multitask-*.yaml``, `recipe`); two commands use it (`lorakit.cli.multitask`):

- ``lorakit multitask RECIPE`` (`runs.run_multitask`) trains every task at once. ``design: per-task`` gives
  each task its own adapter and routes every batch row to its task's adapter (`lorakit.route`), so N adapters
  train in one pass over the base. ``design: shared`` adds one shared adapter on every row plus a small adapter
  per task (task-agnostic + task-specific low-rank modules: Agiza et al. 2024, "MTLoRA", section 3.2), and
  exports each task as one plain PEFT LoRA: ``cat`` of shared and task part, exactly their sum. Per-task
  adapters are then combined with `add_weighted_adapter` (linear / cat / svd) and every task is scored with
  each combination.
- ``lorakit continual RECIPE`` (`continual.run_continual`) trains the tasks one after another and writes the
  forgetting matrix (metric on every task after each stage) for full fine-tuning, one LoRA adapter trained in
  sequence, and one adapter per task.

Every path trains through `lorakit.train`'s one step and loop (`train_step`, `run_training`), so the recipe's
``train`` settings mean what they mean in `lorakit train`: bf16 autocast (``precision``), clipping, LoRA+,
the schedule, and each task's rows in the order `lorakit train` draws them (`lorakit.train.DataOrder`: seeded,
grouped by length with ``group_by_length``, cycled through epochs up to ``max_steps``). Settings of a single
run that have no meaning here are refused when the recipe is read (``checkpoint_every``,
``early_stopping_patience``, ``train_norm_stats``).

Why a mixed batch trains each adapter exactly as training it alone would: adapters share no parameter and the
loss is ``sum_t L_t / N_t`` (task t's summed loss over its own count of rows or answer tokens), so adapter t's
gradient is its own task's mean-loss gradient; gradient norms are clipped per adapter; AdamW is elementwise, so
one optimizer over all adapters moves each as its own optimizer would; and every step holds the same rows of each
task as a single-task run. LoRA biases (``bias: lora_only/all``) would be shared between tasks and are refused.
With dropout > 0 the masks differ, so the equality then holds in distribution only.

Several processes (``torchrun``, ``train.sharding: ddp | fsdp``): `runs.run_multitask` wraps the model once,
after every adapter is added (`lorakit.distributed.wrap`); each process takes rows ``rank::size`` of every task's
micro-batch (`training.mixed_batches`), the step's loss counts are summed over processes, so the run equals one
process's; under FSDP each task adapter is gathered and checked before the main process writes it. What cannot
run that way is refused before loading (`data.check_processes`): continual runs, ``--benchmark``, fewer rows per
task than processes, and under FSDP the shared design's export and the combinations.

Normalisation layers of the frozen base run with their running statistics (`lorakit.train.train_mode`): batch
statistics would couple rows of different tasks, and updating running statistics would change the base under
earlier tasks' adapters.
"""

from .adapters import (add_task_adapters, adapter_parameters, evaluate_combinations, evaluate_task, export_task,
                       restore, snapshot)
from .continual import HeadBank, continual_strategy, forgetting_summary, run_continual
from .data import Base, TaskData, load_base, load_tasks
from .recipe import (COMBINE_METHODS, DESIGNS, SHARED, STRATEGIES, CombineArgs, ContinualArgs, MultitaskRecipe,
                     TaskSpec, load_multitask_recipe, multitask_recipe_from_dict)
from .reports import STRATEGY_LABELS, stage_curves, write_continual_report, write_multitask_report
from .runs import run_multitask
from .training import benchmark, concat_batches, mixed_batches, train_mixed, train_one_after_another

__all__ = [
    "COMBINE_METHODS", "DESIGNS", "SHARED", "STRATEGIES", "STRATEGY_LABELS", "Base", "CombineArgs",
    "ContinualArgs", "HeadBank", "MultitaskRecipe", "TaskData", "TaskSpec", "adapter_parameters",
    "add_task_adapters", "benchmark", "concat_batches", "continual_strategy", "evaluate_combinations",
    "evaluate_task", "export_task", "forgetting_summary", "load_base", "load_multitask_recipe", "load_tasks",
    "mixed_batches", "multitask_recipe_from_dict", "restore", "run_continual", "run_multitask", "snapshot",
    "stage_curves", "train_mixed", "train_one_after_another", "write_continual_report", "write_multitask_report",
]
