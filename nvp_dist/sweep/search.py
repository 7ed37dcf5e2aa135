"""What Tune explores and how: the search space as Tune domains, the scheduler, the search algorithm.

Schedulers measure time in training steps (the `step` every evaluation reports), not in Tune's
`training_iteration`: a trial resumed after the driver died restarts Tune's iteration count but not its
step, so ASHA's rungs stay where they were.
"""
from __future__ import annotations

from typing import Any, Dict

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher

from nvp_dist.config import ConfigError
from nvp_dist.sweep.config import ParamSpec, SweepConfig

TIME_ATTR = "step"


def domain(spec: ParamSpec) -> Any:
    if spec.type == "grid":
        return tune.grid_search(list(spec.values))
    if spec.type == "choice":
        return tune.choice(list(spec.values))
    if spec.type == "uniform":
        return tune.uniform(spec.low, spec.high)
    if spec.type == "loguniform":
        return tune.loguniform(spec.low, spec.high)
    return tune.randint(int(spec.low), int(spec.high))


def param_space(sweep: SweepConfig) -> Dict[str, Any]:
    """Flat dotted training keys -> Tune domains; a trial's config is then {key: sampled value}."""
    return {key: domain(spec) for key, spec in sweep.specs().items()}


def scheduler(sweep: SweepConfig) -> TrialScheduler:
    s = sweep.scheduler
    if s.type == "asha":
        max_t = s.max_t or sweep.training_config({}).train.steps
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        # Grid entries stay fixed per trial; every sampled key may be resampled or perturbed.
        mutations = {k: domain(spec) for k, spec in sweep.specs().items() if spec.type != "grid"}
        return PopulationBasedTraining(time_attr=TIME_ATTR, perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations)
    return FIFOScheduler()


def search_algorithm(sweep: SweepConfig) -> Searcher | BasicVariantGenerator:
    if sweep.search.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401  (OptunaSearch only fails on first use without it)
        except ImportError:
            raise ConfigError("search.algorithm=optuna needs the optuna package: pip install optuna") from None
        return OptunaSearch(seed=sweep.search.seed)
    # Tune's default generator samples at random and expands grid entries; the seed makes a sweep
    # repeatable. Given as an instance, it must carry the concurrency limit itself (Tune ignores
    # max_concurrent_trials for it).
    return BasicVariantGenerator(random_state=sweep.search.seed, max_concurrent=sweep.max_concurrent)


def tune_config(sweep: SweepConfig) -> tune.TuneConfig:
    searcher = search_algorithm(sweep)
    # Tune's own trial resources are only the drivers' (resources.driver_cpus): this limit, not Ray's
    # scheduler, is what keeps trials from queueing for the workers' CPUs and GPUs.
    return tune.TuneConfig(metric=sweep.metric, mode="min", scheduler=scheduler(sweep), search_alg=searcher,
                           num_samples=sweep.num_samples,
                           max_concurrent_trials=None if isinstance(searcher, BasicVariantGenerator)
                           else sweep.max_concurrent)
