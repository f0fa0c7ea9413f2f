"""The collected tests: an audit file gives one item per audited layer, which passes or fails on its gates."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .session import audit_session_key

if TYPE_CHECKING:
    from ..gates.config import AuditCatalog
    from ..results.outcomes import Gate, GateOutcome
    from ..models import LayerSpec, ModelSpec
    from .session import AuditSession
    from ..results.result import AuditResult


def is_audit_file(path: str, config: pytest.Config) -> bool:
    """Whether the file at ``path`` is an audit YAML file (its name matches ini memaudit_files)."""
    return any(fnmatch.fnmatch(Path(path).name, pattern) for pattern in config.getini("memaudit_files"))


class AuditYamlFile(pytest.File):
    """An audit YAML file: collects one LayerItem per layer of the audited model, or, when the
    file is about other models (it declares models of its own, not the audited one), one skipped
    item per model it declares."""

    def collect(self):
        from ..errors import ConfigError
        from ..pipeline.hardware import passive_openmp_waits

        passive_openmp_waits()  # an audit is asked for: before anything imports torch
        state = self.config.stash[audit_session_key]
        try:
            settings = state.load_settings()
            audit = state.audit_file(self.path)
            spec = (state.load_catalog().model_spec(settings.model) if state.stored is None
                    else stored_model_spec(state.load_catalog(), next(iter(state.stored.values()))))
        except ConfigError as exc:
            raise self.CollectError(f"memaudit: {exc}") from None
        if not audit.applies_to(spec.name):
            for name in audit.user_models:
                reason = (f"memaudit: {self.path.name} is about model {name}; this run audits {spec.name} "
                          f"(--memaudit-model {name} audits it)")
                yield OtherModelItem.from_parent(self, name=name, reason=reason)
            return
        try:
            from ..gates.thresholds import without_rise_gates
            from ..results.outcomes import MODEL_GATES

            overrides = state.threshold_overrides()
            thresholds = audit.thresholds_for(spec, overrides)
            if state.baseline is None and not state.compare_previous:  # compare gates need something to compare with
                applied = {name: without_rise_gates(limits) for name, limits in thresholds.items()}
                state.unapplied_compare_gates |= applied != thresholds
                thresholds = applied
            if settings.holdout == "none" and state.stored is None:  # asked for explicitly: gate on the rest
                thresholds = {name: self._without_holdout_gates(state, limits) for name, limits in thresholds.items()}
            audit.check_gates(thresholds, overridden=bool(overrides))
        except ConfigError as exc:
            raise self.CollectError(f"memaudit: {exc}") from None
        self._check_gates_can_be_evaluated(state, settings, spec, thresholds)
        self._check_permutations_reach(settings, spec, thresholds, audit.multiple_testing)
        if spec.factory is not None and state.stored is None:
            self._check_user_layers(state, spec)
        state.multiple_testing = audit.multiple_testing
        state.spec = spec
        gate, gated = self._verdict_gate(state, thresholds)
        thresholds = {name: {key: value for key, value in limits.items() if key not in MODEL_GATES}
                      for name, limits in thresholds.items()}
        state.thresholds.update(thresholds)
        checkpoints = list(state.series or state.stored or [None])  # [None]: one run
        for layer in spec.layers:
            for checkpoint in checkpoints:
                name = layer.name if checkpoint is None else f"{layer.name}[{checkpoint}]"
                yield LayerItem.from_parent(self, name=name, layer=layer, thresholds=thresholds[layer.name],
                                            checkpoint=checkpoint)
        if gated:
            from ..gates.verdictgate import ITEM

            for checkpoint in checkpoints:
                name = ITEM if checkpoint is None else f"{ITEM}[{checkpoint}]"
                yield VerdictItem.from_parent(self, name=name, gate=gate, checkpoint=checkpoint)

    def _verdict_gate(self, state: AuditSession, thresholds: dict) -> "tuple[Gate | None, bool]":
        """The model's verdict_p_min gate (None: off, or left out for want of held-out images), and
        whether it has an item (to run, or to skip saying why); the verdicts' level follows it."""
        from ..gates.verdictgate import VERDICT_GATE, level_of, verdict_gate

        gate = verdict_gate(thresholds)
        if gate is not None:
            level = level_of(gate)
            if state.verdict_level not in (None, level):
                raise self.CollectError(f"memaudit: {self.path}: {VERDICT_GATE} gives the verdicts the level {level:g}, "
                                        f"and another audit file gives them {state.verdict_level:g}: set it in one file")
            state.verdict_level = level
        return gate, gate is not None or VERDICT_GATE in state.unevaluated_holdout_gates

    @staticmethod
    def _without_holdout_gates(state: AuditSession, limits: dict) -> dict:
        """A layer's thresholds without the gates that need held-out images, which ``state`` records."""
        from ..gates.thresholds import holdout_gates

        left_out = holdout_gates(limits)
        state.unevaluated_holdout_gates.update(left_out)
        return {key: value for key, value in limits.items() if key not in left_out}

    def _check_user_layers(self, state: AuditSession, spec: "ModelSpec") -> None:
        """A user model is built now (once) so that a misspelled module path is a collection error;
        a model that cannot be built is a usage error when collection is done."""
        net = state.user_model(spec)
        if net is None:
            return
        from ..errors import AuditError
        from ..models.hooks import find_module

        modules = dict(net.named_modules())
        for layer in spec.layers:
            try:
                find_module(net, layer, modules)
            except AuditError as exc:
                where = state.load_catalog().declared_in.get(spec.name, self.path)
                raise self.CollectError(f"memaudit: {where}: models: {spec.name}: audited_layers: {exc}") from None

    def _check_permutations_reach(self, settings, spec, thresholds, method: str) -> None:
        """A p-value gate that the permutations cannot reach after the correction could never fail:
        say so now (a warning), with the count that would."""
        import warnings

        from ..errors import MemauditWarning
        from ..results.outcomes import Gate

        limits = [gate.limit for gate in (thresholds[layer.name].get("membership_p_min") for layer in spec.layers)
                  if isinstance(gate, Gate) and gate.limit is not None]
        tests = len(spec.layers) if method == "holm" else 1
        smallest = tests / (settings.permutations + 1)
        if limits and smallest >= min(limits):
            warnings.warn(MemauditWarning(
                f"membership_p_min = {min(limits):g} cannot fail: with {settings.permutations:,} permutations the "
                f"smallest p-value after the {method} correction over {tests} layer(s) is {smallest:.3g}; use "
                f"--memaudit-permutations {math.ceil(tests / min(limits))} or more"))
        from ..gates.verdictgate import VERDICT_GATE, smallest_verdict_p, verdict_gate

        gate = verdict_gate(thresholds)
        if gate is not None:
            smallest, factor = smallest_verdict_p(len(spec.layers), spec.loss is not None,
                                                  max(1, settings.augmentations), settings.permutations, method)
            if smallest >= gate.limit:
                warnings.warn(MemauditWarning(
                    f"{VERDICT_GATE} = {gate.limit:g} cannot fail: with {settings.permutations:,} permutations the "
                    f"verdict's smallest p after its two-stage {method} correction is {smallest:.3g}; use "
                    f"--memaudit-permutations {math.ceil(factor / gate.limit)} or more"))

    def _check_gates_can_be_evaluated(self, state: AuditSession, settings, spec, thresholds) -> None:
        """A gate whose figure this audit (or the stored one, or the baseline) will not have is an error now,
        not a silent pass later."""
        from ..pipeline.settings import audit_has
        from ..gates.thresholds import figures_had, missing_figures, rises_had

        has = audit_has(settings, spec) if state.stored is None else figures_had(next(iter(state.stored.values())))
        if state.baseline is not None or state.compare_previous:
            has |= rises_had(has, has if state.baseline is None else figures_had(state.baseline))
        missing = {key: need for layer in spec.layers for key, need in missing_figures(thresholds[layer.name], has)}
        if missing:
            lines = [f"{key} needs {need}" for key, need in missing.items()]
            audit = "this audit" if state.stored is None else f"the stored audit {state.stored_path}"
            provide = "Provide what they need" if state.stored is None else "Audit again with what they need"
            raise self.CollectError(
                f"memaudit: {self.path}: gates {audit} cannot evaluate: {'; '.join(lines)}. {provide}, or turn them "
                f"off (e.g. --memaudit-threshold {next(iter(missing))}=off)."
            )


class OtherModelItem(pytest.Item):
    """A model that an audit file declares and this run does not audit: skipped, with the reason."""

    def __init__(self, *, reason: str, **kwargs):
        super().__init__(**kwargs)
        self.add_marker(pytest.mark.skip(reason=reason))

    def runtest(self) -> None:  # never runs: skipped
        pass

    def reportinfo(self):
        return self.path, 0, f"memaudit model {self.name}"  # a skip report needs a line


def stored_model_spec(catalog: "AuditCatalog", stored: "AuditResult") -> "ModelSpec":
    """The model of a stored audit, with the layers it audited: as the audit files or the built-in registry
    declare it, or (a model declared nowhere now) as the stored layers say. ConfigError when a stored
    layer is not the declared model's."""
    from ..errors import ConfigError
    from ..models import LayerSpec, ModelSpec

    audited = [(layer.name, layer.module) for layer in stored.layers]
    try:
        spec = catalog.model_spec(stored.model)
    except ConfigError:
        return ModelSpec(stored.model, tuple(LayerSpec(name, module) for name, module in audited), build=None)
    declared = {(layer.name, layer.module) for layer in spec.layers}
    foreign = [f"{name} ({module})" for name, module in audited if (name, module) not in declared]
    if foreign:
        raise ConfigError(f"the stored audit's layer(s) {', '.join(foreign)} are not layers of model {spec.name} as "
                          f"declared now ({', '.join(layer.name for layer in spec.layers)})")
    return replace(spec, layers=tuple(layer for layer in spec.layers if (layer.name, layer.module) in audited))


class LayerGateFailure(Exception):
    """A layer's figures crossed a threshold."""


class LayerItem(pytest.Item):
    """One audited layer: passes when every figure is within its thresholds."""

    def __init__(self, *, layer: "LayerSpec", thresholds: dict, checkpoint: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer
        self.thresholds = thresholds
        self.checkpoint = checkpoint  # its label in a checkpoint series; None: the one audited checkpoint

    def runtest(self) -> None:
        import math
        import warnings

        from ..errors import MemauditWarning
        from ..gates.thresholds import evaluate_layer

        state = self.config.stash[audit_session_key]
        result = state.result_for(self.checkpoint)
        layer = result.layer(self.layer.name)
        outcome, figures = evaluate_layer(layer, self.thresholds, state.adjusted_p(self.checkpoint)[layer.name],
                                          state.rise_figures(layer.name, self.checkpoint))
        self.user_properties += [(f"memaudit_{name}", round(figure.value, 6))
                                 for name, figure in figures.items() if math.isfinite(figure.value)]
        if outcome.warnings:
            warnings.warn(MemauditWarning(outcome.warning_message()))
        if not outcome.passed:
            raise LayerGateFailure(outcome)
        if outcome.untestable:
            pytest.skip(f"memaudit: {outcome.untestable_message()}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, LayerGateFailure):
            outcome: GateOutcome = excinfo.value.args[0]
            return outcome.failure_message()
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        where = "" if self.checkpoint is None else f" of checkpoint {self.checkpoint}"
        return self.path, None, f"memaudit layer {self.layer.name} ({self.layer.module}){where}"


class VerdictGateFailure(Exception):
    """The model's verdict is detected: its corrected p crossed verdict_p_min."""


class VerdictItem(pytest.Item):
    """The audited model's verdict (metric/verdict.py) over every signal and layer: fails when memorization
    is detected (gates/verdictgate.py); skipped, saying why, when the audit has no test to decide it."""

    def __init__(self, *, gate: "Gate | None", checkpoint: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.gate = gate  # None: left out, the run has no held-out images
        self.checkpoint = checkpoint

    def runtest(self) -> None:
        import warnings

        from ..errors import MemauditWarning
        from ..gates.verdictgate import evaluate_verdict, gate_message, not_testable

        result = self.config.stash[audit_session_key].result_for(self.checkpoint)
        verdict = result.verdict if self.gate is not None else None
        reason = not_testable(verdict)
        if reason is not None:
            pytest.skip(f"memaudit: {reason}")
        outcome = evaluate_verdict(verdict, self.gate)
        result.verdict_gate = outcome
        self.user_properties += [("memaudit_verdict", verdict.memorization),
                                 ("memaudit_verdict_p", round(verdict.p_value, 6) if math.isfinite(verdict.p_value)
                                  else None), ("memaudit_verdict_p_min", self.gate.limit)]
        if outcome.warnings:
            warnings.warn(MemauditWarning(gate_message(verdict, outcome)))
        if not outcome.passed:
            raise VerdictGateFailure(gate_message(verdict, outcome))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, VerdictGateFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        where = "" if self.checkpoint is None else f" of checkpoint {self.checkpoint}"
        return self.path, None, f"memaudit verdict of the model over every layer{where}"


def check_baseline_architecture(state: AuditSession) -> None:
    """A baseline of another model or without the selected layers is a usage error, found before compute."""
    if state.baseline is None:
        return
    from ..gates.compare import check_architecture
    from ..errors import AuditError

    layers = [(layer.name, layer.module) for layer in state.spec.layers if layer.name in state.wanted_layers]
    try:
        check_architecture(state.spec.name, layers, state.baseline, state.baseline_label)
        if state.stored is None:
            from ..gates.compare import check_views
            from ..pipeline.views import recipe_for

            check_views(recipe_for(state.load_settings(), state.spec).record(), state.baseline, state.baseline_label)
    except AuditError as exc:
        raise pytest.UsageError(f"memaudit: cannot compare with the baseline: {exc}") from None
