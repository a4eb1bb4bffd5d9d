"""Evidence for LoRA's claims, measured on a recipe: `compare` full fine-tuning with LoRA, `sweep` ranks and
learning rates, `recommend` a rank and learning rate cheaply.

Modules, one job each: `runs` (one training run = one process, reused when its spec matches), `probes` (the
knowledge probes), `claims` (tolerances, verdict rows; the metric comes from `lorakit.tasks`), `compare` (the
comparison and its verdicts), `ranks` (a recipe at another rank: the alpha rule and per-layer caps), `sweep`,
`recommend`, `reports` (the three reports). Verdicts are computed from the numbers by the rule written beside
each claim; the reports render them and never edit them. The commands (``lorakit compare / sweep / recommend /
inspect``) are in `lorakit.cli.evidence`.
"""

from .claims import COST_MARGIN, TOLERANCE, ClaimRow
from .compare import compare, fraction_sizes, judge, summarize
from .probes import PROBES, mean_reciprocal_rank, probe_for, run_probe, text_perplexity
from .ranks import RACE_FACTOR, race_arms
from .recommend import next_power_of_two, recommend, suggest_lr, suggest_rank
from .runs import RunSpec, launch
from .sweep import sweep, sweep_summary

__all__ = ["COST_MARGIN", "PROBES", "RACE_FACTOR", "TOLERANCE", "ClaimRow", "RunSpec", "compare",
           "fraction_sizes", "judge", "launch", "mean_reciprocal_rank", "next_power_of_two",
           "probe_for", "race_arms", "recommend", "run_probe", "summarize", "suggest_lr", "suggest_rank", "sweep",
           "sweep_summary", "text_perplexity"]
