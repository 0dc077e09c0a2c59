"""The fine-tune proof planned once, from the config alone, at parse time (no torch): :class:`ProofPlan`.

The Snakefile plans the proof (:func:`plan_proof`) and hands the plan to the ``finetune_proof``
job as one param (:meth:`ProofPlan.to_dict`, :meth:`ProofPlan.from_dict`): the training settings
(:class:`ProofSettings`), the projection settings the proof compares with the declared files that
serve each (:class:`ProjectionSetting`), which of them is the run's own, and every variant in the
order it runs (:class:`Variant`). The rules that make the settings' files (rules/finetune.smk:
``proof_features``, ``proof_covariance``, ``proof_projection``) and the job's inputs come from the
same plan, so the job reads the files it declares and plans nothing itself.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, replace

from nullcov.docs import see
from nullcov.layout import Results, step_name
from nullcov.schema import schema_default

SCOPES = ("per-timestep", "all-timesteps")
#: ``unconditional_branch`` of the statistics -> how the table names it.
BRANCH_LABELS = {False: "conditional", True: "both"}
#: A :data:`BRANCH_LABELS` label -> the ``unconditional_branch`` its statistics are collected with.
UNCONDITIONAL_BRANCH = {label: both for both, label in BRANCH_LABELS.items()}
#: :class:`ProofSettings` field -> the config key it is planned from.
CONFIG_KEYS = {
    "learning_rate": "finetune_learning_rate",
    "lora_learning_rate": "finetune_lora_learning_rate",
    "lora_rank": "finetune_lora_rank",
    "eval_every": "finetune_eval_every",
    "max_steps": "finetune_max_steps",
    "fixed_steps": "finetune_steps",
    "target_fidelity": "finetune_target_fidelity",
    "seed": "seed",
    "guidance_scale": "guidance_scale",
    "high_noise_fraction": "finetune_high_noise_fraction",
    "seeds": "finetune_seeds",
}
#: Concept fidelities at which the variants are compared (:mod:`nullcov.proof.curves`).
MATCHED_FIDELITIES = (0.4, 0.6, 0.8)
#: Kinds whose updates are projected and that have a same-rank random control (``random-<kind>``).
CONTROLLED_KINDS = ("projected", "projected-kv", "custom-diffusion")
#: The kinds an SD3/FLUX model's proof trains (:mod:`nullcov.proof.flow`: the training mechanics).
FLOW_KINDS = ("unconstrained", "projected", "projected-lora", "random-projected")
#: The config keys that plan the kinds an SD3/FLUX proof cannot train -> that kind: prior preservation
#: (its class images are the shapes world's, compared by the evaluator), ``projected-kv`` and
#: ``custom-diffusion`` (a UNet's ``to_k``/``to_v`` and its text encoder's token embedding).
FLOW_REFUSED_KEYS = {"finetune_prior_preservation": "prior-preservation", "finetune_text_only": "projected-kv",
                     "finetune_custom_diffusion": "custom-diffusion"}


def check_flow_proof(config: dict) -> None:
    """Refuse a ``finetune_proof`` config that plans runs an SD3/FLUX model cannot train (:data:`FLOW_KINDS`
    only), naming every key to change."""
    refused = set(FLOW_REFUSED_KEYS.values())
    keys = [key for key in FLOW_REFUSED_KEYS if config[key]]
    lists = {key: [name for name in config[key] if name in refused]
             for key in ("finetune_repeated", "finetune_grid_variants")}
    if keys or any(lists.values()):
        fixes = [f"{key}=false" for key in keys] + [
            f"{key}='{json.dumps([name for name in config[key] if name not in refused])}'"
            for key, names in lists.items() if names]
        raise ValueError(f"finetune_proof on an SD3/FLUX model trains {', '.join(FLOW_KINDS)} runs only (the training "
                         f"mechanics: no evaluator); {sorted(refused)} need a UNet: --config {' '.join(fixes)}"
                         f"{see('fine-tune-proof-variants-an-sd3-or-flux-model-cannot-train')}")


def _configured(name: str):
    """A field of a config key: its default is the key's in config/schema.yaml (no second copy here)."""
    return field(default_factory=functools.partial(schema_default, CONFIG_KEYS[name]))


@dataclass(frozen=True)
class ProofSettings:
    """The experiment's knobs: those of config keys (:data:`CONFIG_KEYS`, planned by
    :meth:`from_config`; left out, the schema's default), then the experiment's own."""

    learning_rate: float = _configured("learning_rate")
    lora_learning_rate: float = _configured("lora_learning_rate")
    lora_rank: int = _configured("lora_rank")
    eval_every: int = _configured("eval_every")
    max_steps: int = _configured("max_steps")
    fixed_steps: int = _configured("fixed_steps")
    target_fidelity: float = _configured("target_fidelity")
    seed: int = _configured("seed")
    guidance_scale: float = _configured("guidance_scale")
    #: Share of the training batches whose timestep is drawn from [high_noise_start, T) instead of
    #: [0, T): the layout is decided at high noise (how builtin:shapes was trained); 0 = uniform.
    high_noise_fraction: float = _configured("high_noise_fraction")
    seeds: int = _configured("seeds")
    #: Whether an evaluator reads the images (the model is builtin:shapes): else every variant
    #: trains ``fixed_steps`` and the evaluator's columns are NaN.
    evaluate: bool = True
    batch_size: int = 4
    concept_seeds: int = 2
    instances: int = 8
    class_images: int = 32
    prior_weight: float = 1.0
    sample_batch: int = 48
    high_noise_start: int = 600
    #: Every how many preserved prompts one is sampled at each checkpoint (144 / 3 = 48, the same
    #: prompts and seeds at every checkpoint; all of them at the end).
    checkpoint_stride: int = 3
    #: Fine-tune seed ``k`` is ``seed + seed_stride * k``.
    seed_stride: int = 1000

    def run_seed(self, seed_index: int) -> int:
        """The seed of a run's data order, noise and initialisations (fine-tune seed ``seed_index``)."""
        return self.seed + self.seed_stride * seed_index

    @classmethod
    def from_config(cls, config: dict, model_dir=None) -> ProofSettings:
        """The settings of a workflow config: its ``finetune_*`` keys, ``seed``, ``guidance_scale``,
        and ``evaluate`` when the model is builtin:shapes or its folder ``model_dir`` holds a model
        trained on the shapes world (:func:`nullcov.shapes.evaluator.reads_model`)."""
        from nullcov.models.model import BUILTIN_SHAPES
        from nullcov.shapes.evaluator import reads_model

        return cls(**{name: config[key] for name, key in CONFIG_KEYS.items()},
                   evaluate=config["model"] == BUILTIN_SHAPES or (model_dir is not None and reads_model(model_dir)))


def threshold_settings(config: dict) -> list[tuple[float, float | None]]:
    """``(nullspace_threshold, threshold_percent)`` of every projection the proof compares: the run's
    own first, then each ``finetune_nullspace_thresholds`` and each ``finetune_threshold_percents``
    that differs from it."""
    own = (config["nullspace_threshold"], config["threshold_percent"])
    others = [(float(t), None) for t in config["finetune_nullspace_thresholds"]]
    others += [(0.0, float(p)) for p in config["finetune_threshold_percents"]]
    labels = [threshold_label(*own)]
    settings = [own]
    for setting in others:
        if threshold_label(*setting) not in labels:
            labels.append(threshold_label(*setting))
            settings.append(setting)
    return settings


def own_setting(config: dict, statistics: list[str], thresholds: list[tuple[float, float | None]]) -> tuple:
    """(branches, statistic, threshold label) of the run's own projections: its CFG branches, the
    first statistic compared, the first threshold (the run's own, :func:`threshold_settings`)."""
    return BRANCH_LABELS[bool(config["unconditional_branch"])], statistics[0], threshold_label(*thresholds[0])


def compared_settings(own: tuple[str, str, str], branches: list[bool], statistics: list[str],
                      thresholds: list[tuple[float, float | None]]) -> list[tuple[str, str, str]]:
    """The (branches, statistic, threshold label) settings whose projected variants the proof runs: the
    run's own first, then one setting per other value of one knob with the other two at the run's own
    (each other CFG-branch setting, each other statistic, each other threshold), so every knob is
    compared against the same reference without the cost of every combination."""
    own_branches, own_statistic, own_threshold = own
    settings = [own]
    settings += [(BRANCH_LABELS[both], own_statistic, own_threshold) for both in branches]
    settings += [(own_branches, statistic, own_threshold) for statistic in statistics]
    settings += [(own_branches, own_statistic, threshold_label(*setting)) for setting in thresholds]
    return list(dict.fromkeys(settings))


def threshold_label(nullspace_threshold: float, threshold_percent: float | None) -> str:
    """As the table reports it: the absolute threshold, or ``p<percent>``."""
    return f"p{threshold_percent:g}" if threshold_percent is not None else f"{nullspace_threshold:g}"


@dataclass(frozen=True)
class ProjectionSetting:
    """One projection setting the proof compares (CFG branches of the statistics, statistic,
    threshold) and the declared files that serve it: the schedule, the merged moments of those
    statistics and the projections made at this setting (every step's and text's; paths as the
    rules declare them, relative to the workflow's working directory)."""

    branches: str
    statistic: str
    threshold: str
    nullspace_threshold: float
    threshold_percent: float | None
    schedule: str = ""
    covariance: tuple[str, ...] = ()
    projections: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        """(branches, statistic, threshold label): how the table names the setting."""
        return self.branches, self.statistic, self.threshold

    def file(self, kind: str, name: str) -> str:
        """The ``covariance`` or ``projections`` file of one step (or text) at this setting."""
        return next(path for path in getattr(self, kind) if step_name(path) == name)


@dataclass(frozen=True)
class Variant:
    """One fine-tune run: its name, kind, scope and projection setting (None: not projected; the
    ``projected-lora`` variant gets the best projected one once the projected variants have run,
    :func:`nullcov.proof.experiment.best_projected`), which fine-tune seed (``seed_index``) and
    learning rate (None: the settings' own for its kind) it trains with, and the variant it is a run
    of (``group``: its name without the ``-seed<k>`` / ``-lr<rate>`` suffix; the curves are averaged
    per group and learning rate). ``random-projected`` runs are the same-rank random controls of
    the projected variant named by ``group`` minus ``random-``."""

    name: str
    kind: str
    scope: str = "-"
    setting: ProjectionSetting | None = None
    seed_index: int = 0
    learning_rate: float | None = None
    group: str = ""

    @property
    def variant(self) -> str:
        """The variant this run belongs to (``group``, or the name itself)."""
        return self.group or self.name

    @property
    def projected(self) -> bool:
        return self.setting is not None

    @property
    def branches(self) -> str:
        return self.setting.branches if self.setting is not None else "-"

    @property
    def statistic(self) -> str:
        return self.setting.statistic if self.setting is not None else "-"

    @property
    def threshold(self) -> str:
        return self.setting.threshold if self.setting is not None else "-"


@dataclass(frozen=True)
class ProofPlan:
    """The whole proof, planned from the config: settings, compared projection settings (the run's
    own first), the run's own setting's key, and the variants in the order they run."""

    settings: ProofSettings
    scopes: tuple[str, ...]
    compared: tuple[ProjectionSetting, ...]
    own: tuple[str, str, str]
    variants: tuple[Variant, ...]

    def setting(self, key: tuple[str, str, str]) -> ProjectionSetting:
        """The compared setting of ``key`` (branches, statistic, threshold label)."""
        found = [setting for setting in self.compared if setting.key == tuple(key)]
        if not found:
            raise KeyError(f"the proof compares no projection setting {tuple(key)}")
        return found[0]

    @property
    def names(self) -> list[str]:
        """The variants' names, in the order they run (and their weights are declared)."""
        return [variant.name for variant in self.variants]

    def files(self, kind: str) -> list[str]:
        """Every compared setting's ``covariance`` or ``projections`` files, each once: the job's inputs."""
        return list(dict.fromkeys(path for setting in self.compared for path in getattr(setting, kind)))

    def threshold_values(self) -> dict[str, tuple[float, float | None]]:
        """Threshold label -> (nullspace_threshold, threshold_percent) of every compared setting."""
        return {s.threshold: (s.nullspace_threshold, s.threshold_percent) for s in self.compared}

    def to_dict(self) -> dict:
        """The plan as plain data (a Snakemake param): variants name their setting by its key."""
        compared = [asdict(setting) | {"covariance": list(setting.covariance),
                                       "projections": list(setting.projections)} for setting in self.compared]
        variants = [{"name": v.name, "kind": v.kind, "scope": v.scope, "seed_index": v.seed_index,
                     "learning_rate": v.learning_rate, "group": v.group,
                     "setting": list(v.setting.key) if v.setting is not None else None} for v in self.variants]
        return {"settings": asdict(self.settings), "scopes": list(self.scopes), "compared": compared,
                "own": list(self.own), "variants": variants}

    @classmethod
    def from_dict(cls, data: dict) -> ProofPlan:
        """The plan of :meth:`to_dict`'s data."""
        compared = tuple(ProjectionSetting(**(dict(setting) | {"covariance": tuple(setting["covariance"]),
                                                                "projections": tuple(setting["projections"])}))
                         for setting in data["compared"])
        by_key = {setting.key: setting for setting in compared}
        variants = tuple(Variant(v["name"], v["kind"], v["scope"],
                                 by_key[tuple(v["setting"])] if v["setting"] is not None else None,
                                 v["seed_index"], v["learning_rate"], v["group"])
                         for v in data["variants"])
        return cls(ProofSettings(**data["settings"]), tuple(data["scopes"]), compared, tuple(data["own"]), variants)


def compared_projection_settings(config: dict, results: Results | None = None,
                                 names: list[str] = ()) -> list[ProjectionSetting]:
    """Every setting the proof compares (:func:`compared_settings`, the run's own first) with the
    files that serve it under ``results`` (None: without files), for the step files ``names``
    (the step names and :data:`nullcov.layout.TEXT_NAME`).

    Statistics: the run's own for its own CFG branches, else the proof's
    (:meth:`nullcov.layout.Results.proof_statistics`, rules ``proof_features`` and
    ``proof_covariance``). Projections: the run's own where they are made at this very setting
    (its branches, ``statistic``, ``nullspace_threshold`` and ``threshold_percent``), else the
    proof's (:meth:`nullcov.layout.Results.proof_projection`, rule ``proof_projection``).
    """
    thresholds = threshold_settings(config)
    values = {threshold_label(*setting): setting for setting in thresholds}
    statistics = list(config["finetune_statistics"])
    own = own_setting(config, statistics, thresholds)
    run_branches = own[0]
    settings = []
    for branches, statistic, label in compared_settings(own, config["finetune_branches"], statistics, thresholds):
        setting = ProjectionSetting(branches, statistic, label, *values[label])
        if results is not None:
            made = branches == run_branches and (statistic, *values[label]) == (
                config["statistic"], config["nullspace_threshold"], config["threshold_percent"])
            source = results if branches == run_branches else results.proof_statistics(branches)
            projections = [results.projection(name) if made else
                           results.proof_projection(branches, statistic, label, name) for name in names]
            setting = ProjectionSetting(branches, statistic, label, *values[label], schedule=str(results.schedule),
                                        covariance=tuple(str(source.covariance(name)) for name in names),
                                        projections=tuple(map(str, projections)))
        settings.append(setting)
    return settings


def plan_variants(config: dict, compared: list[ProjectionSetting]) -> list[Variant]:
    """Every run in the order they run: first each variant's first run (fine-tune seed 0, its own
    learning rate): ``unconstrained``, ``prior-preservation`` (``finetune_prior_preservation``), one
    ``projected`` variant per compared setting and scope, ``projected-kv`` (``finetune_text_only``:
    trains only ``to_k``/``to_v``, whose inputs, the frozen text encoder's states, no update can
    shift, with the run's own setting), ``custom-diffusion`` (``finetune_custom_diffusion``: the
    same, and the identifier's token embedding trained, so only prompts that hold it change their
    text states), ``projected-lora`` (``finetune_lora_rank`` > 0), whose
    setting is chosen after the projected runs (:func:`nullcov.proof.experiment.best_projected`), so
    it is planned without one; then the repeats (:func:`repeated_runs`)."""
    thresholds = threshold_settings(config)
    own = own_setting(config, list(config["finetune_statistics"]), thresholds)
    variants = [Variant("unconstrained", "unconstrained")]
    if config["finetune_prior_preservation"]:
        variants.append(Variant("prior-preservation", "prior-preservation"))
    variants += [Variant(f"projected-{scope}-{setting.threshold}-{setting.statistic}-{setting.branches}",
                         "projected", scope, setting) for setting in compared for scope in config["finetune_scopes"]]
    if config["finetune_text_only"]:
        variants.append(Variant("projected-kv", "projected-kv", "per-timestep",
                                next(setting for setting in compared if setting.key == own)))
    if config["finetune_custom_diffusion"]:
        variants.append(Variant("custom-diffusion", "custom-diffusion", "per-timestep",
                                next(setting for setting in compared if setting.key == own)))
    if config["finetune_lora_rank"] > 0:
        variants.append(Variant("projected-lora", "projected-lora"))
    return variants + repeated_runs(config, variants)


def repeated_runs(config: dict, variants: list[Variant]) -> list[Variant]:
    """The runs beyond each variant's first: for the variants of ``finetune_repeated`` (each must be
    planned, ``projected-lora`` excepted: its setting is chosen during the run), fine-tune seeds 1 ..
    ``finetune_seeds`` - 1 (``<name>-seed<k>``); for those of ``finetune_grid_variants``, each other
    rate of ``finetune_learning_rate_grid`` (``<name>-lr<rate>``, seed 0); and with
    ``finetune_random_control``, for each projected one of ``finetune_repeated``, a same-rank random
    control (``random-<name without projected->``, seed 0, kind ``random-<kind>``)."""
    by_name = {variant.name: variant for variant in variants if variant.kind != "projected-lora"}
    for key in ("finetune_repeated", "finetune_grid_variants"):
        unknown = [name for name in config[key] if name not in by_name]
        if unknown:
            raise ValueError(f"{key}: {unknown} are not variants the proof plans with this config; "
                             f"planned: {sorted(by_name)}")
    seeds = [replace(by_name[name], name=f"{name}-seed{k}", seed_index=k, group=name)
             for name in config["finetune_repeated"] for k in range(1, config["finetune_seeds"])]
    rates = [replace(by_name[name], name=f"{name}-lr{rate:g}", learning_rate=float(rate), group=name)
             for name in config["finetune_grid_variants"] for rate in config["finetune_learning_rate_grid"]
             if rate != config["finetune_learning_rate"]]
    controls = [replace(by_name[name], name="random-" + name.removeprefix("projected-"),
                        kind="random-" + by_name[name].kind)
                for name in config["finetune_repeated"]
                if config["finetune_random_control"] and by_name[name].kind in CONTROLLED_KINDS]
    return seeds + rates + controls


def plan_proof(config: dict, results: Results, names: list[str], model_dir=None) -> ProofPlan:
    """The proof of a validated workflow config, its files under ``results`` for the step files
    ``names`` (:func:`compared_projection_settings`); ``model_dir``: the model's folder (an evaluator
    reads the images of any model trained on the shapes world, :func:`nullcov.shapes.evaluator.reads_model`)."""
    compared = compared_projection_settings(config, results, names)
    thresholds = threshold_settings(config)
    own = own_setting(config, list(config["finetune_statistics"]), thresholds)
    return ProofPlan(ProofSettings.from_config(config, model_dir), tuple(config["finetune_scopes"]), tuple(compared),
                     own, tuple(plan_variants(config, compared)))
