"""The detectors' thresholds: named, documented, configurable defaults, each with its source.

This docstring is the reference for what gradhealth calls unhealthy. Every number below can be
overridden per diagnosis (`DiagnoseOptions.thresholds = {"exploding_profile_ratio": 200}`);
an unknown name is refused with the list of known names.

Words used below
----------------
- ‖∂L/∂a_l‖: the norm of the loss gradient w.r.t. the output of layer l (a layer = an op with
  parameters plus the activation after it), listed input → output in `profiles.depth`.
- depth ratio: ‖∂L/∂a_first‖ / ‖∂L/∂a_last‖ (first = nearest the input). Below 1 the gradient
  shrinks on its way back to the input, above 1 it grows. When the per-layer fit shrinks by
  more than `exploding_layer_factor` per layer towards the input, "first" is the layer with
  the least gradient, where the profile rises from step by step, not in one jump (evidence
  `depth_ratio_from`): a model with two branches lists a side input's one layer first, while
  the first layer of a deep branch beside it may get next to nothing.
- per-layer factor: the robust (Theil–Sen: median of pairwise slopes) fit of log ‖∂L/∂a_l‖
  against l, read backwards (output → input): 2.0 means the gradient doubles at every layer it
  crosses towards the input. Robust so that one jump (a normalisation dividing by a small std,
  the loss-side head) does not pass for growth that compounds.
- weight ratio: ‖∂L/∂W_first‖ / ‖∂L/∂W_last‖ over the layers that own parameters.
- grad/weight: ‖∂L/∂W‖ / ‖W‖ of one layer: the relative step plain SGD with lr 1 would take.

Detection rules
---------------
vanishing_gradients (axis "depth"), error when ANY of:
  1. depth ratio < `vanishing_profile_ratio` (1e-3): the input side gets a thousandth of the
     gradient the output side gets (AUTOTRAINER's ratio, applied to the activation-gradient
     profile rather than to weight gradients alone);
  2. weight ratio < `vanishing_weight_ratio` (1e-3) AND the first layer's weight-gradient norm
     < `vanishing_first_grad_norm` (1e-4): AUTOTRAINER's vanishing-gradient rule (Zhang et al.,
     "AUTOTRAINER: An Automatic DNN Training Problem Detection and Repair System", ICSE 2021);
  3. absolute scale: every layer's grad/weight < `vanishing_grad_to_weight` (1e-7): no layer would
     move by more than 1e-7 of its size per SGD step at lr 1, whatever the ratios say. This is what
     a tiny initialisation looks like: weight gradients ~1e-14 at every depth, so the ratios above
     stay near 1 (our rule; at lr 1e-3 such a layer needs ~1e10 steps to change by its own size).
  Warning instead of error when only depth ratio < `vanishing_profile_ratio_warning` (1e-2).
  Named layers: those whose ‖∂L/∂a‖ (or weight gradient) is below the threshold times the last
  layer's, worst (smallest) first; for rule 3, every layer.
  Zero-initialised by design: layers whose ‖∂L/∂a‖ is exactly 0 because a parameter after
  them is exactly 0 (weight_norm 0) and multiplies its input (a Linear/conv weight, a
  normalisation's gain, an elementwise mul: an STN localisation head, LoRA's B, ResNet's
  zero_init_residual BatchNorm gain, ControlNet's zero convolutions, ReZero's α, a zero output
  layer) are left out of every rule above: an `info` vanishing_gradients finding (evidence
  `zero_init_blocked`: layer → those parameters; `rules: ["zero_init"]`) says so, with no fix.
  "After them" is read from the depth profile's order (the report carries no graph edges): the
  first layer after the zeros whose ‖∂L/∂a‖ is not 0 must hold such a parameter, and that
  parameter must get a gradient itself (then the first optimizer step moves it off zero and
  unblocks them; one with no gradient stays zero: no design). A zero bias (added, not
  multiplied), a weight that is only partly zero, a rounding (`gradient_cut`) or another
  branch's layer in between explain nothing: those zeros stay judged (dead units, real
  vanishing stay errors).

exploding_gradients (axis "depth"), error when ANY of:
  1. depth ratio > `exploding_profile_ratio` (70, AUTOTRAINER's exploding ratio) AND the per-layer
     factor > `exploding_layer_factor` (1.3): the growth is compounding through the layers, not one
     step (a normalisation layer that divides by a small std makes a single jump);
  2. weight ratio > `exploding_profile_ratio` (AUTOTRAINER's rule on weight gradients);
  3. absolute scale: some layer's grad/weight > `exploding_grad_to_weight` (10): one SGD step at
     lr 0.1 would change that layer by more than its own size (our rule; a ReLU net with a
     too-large init has similar weight gradients at every depth, so rule 2 is blind to it while
     rule 1 sees ‖∂L/∂a‖ double at every layer backwards). A layer whose weight is smaller
     than He/Xavier's (init ratio r < 1) is judged by grad/weight × r, the step against a
     weight of healthy scale: a fresh classifier at N(0, 0.02) has a large grad/weight
     from its tiny weight, which init_scale reports. A layer only a normalisation reads is
     scale-invariant (its gradient grows as its weight shrinks): judged by grad/weight × r²
     (Arora, Li & Lyu 2019). An embedding table is judged against
     nn.Embedding's N(0, 1) the same way (CLIP's and BERT's tables are N(0, 0.02), and the
     rows a batch reads take the whole gradient).
  Warning instead of error when only depth ratio > `exploding_profile_ratio_warning` (10) with
  the per-layer factor above `exploding_layer_factor`.
  Regression target off the output's scale: with a regression loss (mse, l1) whose target's
  RMS, √(mean² + std²), is ≥ `target_scale_ratio` (10) times the output's RMS (at least 1:
  a standardised target is never off), the finding says so (evidence `target_scale`: target
  mean and std, output mean and std, the loss and the ratio): ∂L/∂y is in the target's units
  (2(y − t)/n for mse), so targets ~1e4 make every gradient ~1e4 times larger, which
  standardising the target undoes (the `normalize_targets` fix, ranked before clipping and
  a lower learning rate, which only hide it).

Tensor size (both depth-ratio rules, vanishing and exploding, errors and warnings): a layer's
  ‖∂L/∂a‖ is a norm over its whole output, which a change of size changes without any change of
  the gradient its weights get: a mean over P positions (global average pooling, a mean over
  an audio clip's time steps) divides it by √P, an upsampling's backward sums copies. The
  rules are also judged on the profile per position, ‖∂L/∂a‖ · √positions (positions: entries
  of the output per example over those one application of the layer's weights makes), each
  step's credit bounded by what averaging over the positions lost can explain and never past
  1 (detectors/positions.py), and they hold only where both agree (evidence
  `size_adjusted_depth_ratio` and `positions` where the sizes differ). The weight gradient of
  weights shared over P positions lies between the two views: ‖∂L/∂a‖ when the positions'
  gradients are unrelated, √P · ‖∂L/∂a‖ when they are alike, as a mean's backward makes them.

vanishing/exploding over time (axis "time"), judged only for models with a recurrent layer
  (RNN/GRU/LSTM: a conv or attention model's per-position gradients have no path through time):
  for every input with a sequence axis, the ratio
  ‖∂L/∂x_first‖ / ‖∂L/∂x_last‖ < `vanishing_time_ratio` (1e-3) → vanishing, error for a vanilla
  RNN, warning when every recurrent layer is gated (LSTM/GRU also decay at initialisation, but
  their gates can learn to keep the state; a vanilla RNN cannot);
  > `exploding_time_ratio` (70) → exploding, error (the same AUTOTRAINER ratios, applied over time
  steps as Bengio, Simard & Frasconi 1994 and Pascanu, Mikolov & Bengio 2013 do). The evidence
  gives the per-step factor and the horizon: how many steps back the gradient stays above
  `vanishing_time_ratio` of the last step's.

non_finite: any NaN/Inf in the loss, in a parameter gradient or at a node output is an error;
  the origin is named: the first node (execution order) whose output is non-finite in the
  forward pass, else the first whose backward produced one, with the phase. No threshold.
  NaN/Inf that reach neither the loss nor any parameter gradient (absorbed by a where, a
  comparison, an integer cast: T5's relative-position buckets take log(0); or born in the
  backward pass and zeroed by an earlier op's backward: sqrt of a ReLU's output, whose
  infinite derivative at the zeros the ReLU's backward selects away) are `info` (evidence
  `reaches_loss: false`), its guard advisory. Mask values (-inf written on
  purpose, 0/-inf additive masks in the batch) are no origin at all.

saturation: a sigmoid/tanh-like layer with saturated fraction (the measurement's definition:
  the share of activation entries whose local derivative is below 0.01, stats.py) ≥
  `saturation_fraction_warning` (0.2) → warning, ≥ `saturation_fraction_error` (0.5) → error
  (Glorot & Bengio 2010 show top sigmoid layers saturating and stalling training; the cut-offs
  are ours).

dead_units: a ReLU-like layer whose dead fraction (units zero for every example of the batch) is
  ≥ `dead_fraction_warning` (0.4) → warning, ≥ `dead_fraction_error` (0.7) → error (AUTOTRAINER
  also checks for dying ReLU; these cut-offs are ours). "Zero for the whole
  batch" means little for a batch of one or two: give a batch of 16 or more examples.

quantizer_clipping: a fake quantiser (quantisation-aware training) whose range holds too little
  of what it quantises: the share of entries with round(x / scale) + zero_point outside
  [quant_min, quant_max], which are clamped and get no gradient through the straight-through
  estimator, ≥ `quantizer_clipping_warning` (0.01) → warning, ≥ `quantizer_clipping_error`
  (0.1) → error. Standard calibrations clip far less: max calibration nothing on its data,
  percentile calibration at 99.99 % or 99.999 % 1e-4 or 1e-5 of the entries (Wu et al.,
  "Integer Quantization for Deep Learning Inference", 2020); a moving-average min/max observer
  a batch's few extremes. The cut-offs are ours.

init_scale: a layer's weight std over the std He (ReLU-like) or Xavier (others) would give for
  its fan-in (He et al. 2015; Glorot & Bengio 2010), outside [`init_ratio_low`,
  `init_ratio_high`] = [0.25, 1.5] → warning; outside [`init_ratio_error_low`,
  `init_ratio_error_high`] = [0.02, 5] → error. PyTorch's default (kaiming_uniform with a=√5)
  gives 0.41 of He, hence a low bound below it. RNN/GRU/LSTM layers: the input weight's
  fan-in is the input size (ONNX W [dirs, gates*H, input]), and the reference std is 1/√H (an
  orthogonal recurrent matrix; torch's default U(±1/√H) gives 0.58 of it at any input size).
  Only weights multiplied into a sum over inputs have a fan-in: a parameter added
  (a position embedding), indexed (Swin's relative-position bias table) or concatenated (a
  class token) is not judged. A layer whose output only a normalisation reads (the graph
  says so) is scale-invariant and is not judged, nor is an output projection tied to the
  input embedding (it has the embedding's scale, which the model compensates: T5 scales its
  input by d_model^-0.5).
  In a plain ReLU stack a ratio r multiplies ‖∂L/∂a‖ by about r per layer, so 1.5 over 10
  layers is already ×58.
  Against Xavier, a layer with unequal fans is judged against the nearer end of the range
  Xavier balances, 1/√fan_out (backward variance kept) to 1/√fan_in (forward variance kept):
  a first conv widening 1 channel into 32 of 5×5 (fan-in 25, fan-out 800) at torch's default
  init is 2.4× Xavier's std and 0.58× 1/√fan_in, which is healthy.
  Parameters-only coverage (the activation after a layer is not visible): the weight std,
  ‖W‖/√numel, is compared with He's std for "too large" and with Xavier's for "too small", so
  that a layer is only flagged if it is wrong under either choice.

fp16_underflow: the share of gradient entries lost to fp16 over all parameters. In an fp16 run
  (`--precision fp16`, or a model whose parameters are fp16) it is the share flushed to exactly
  zero against an fp32 reference pass: ≥ `fp16_underflow_fraction` (0.05) → warning, ≥
  `fp16_underflow_fraction_error` (0.5) → error (Micikevicius et al., "Mixed Precision
  Training", 2018, show such gradients lost without loss scaling; the cut-offs are ours).
  In an fp32 run it is a forecast: the share with 0 < |g| < 2^-24 that WOULD flush to zero if
  you trained in fp16, ≥ `fp16_underflow_fraction` → `info` only (the run itself loses
  nothing, so it never turns the verdict or `--fail-on warning`; its loss_scaling / use_bf16
  recommendations are advisory). In a bf16 run (or a bf16 model) there is no finding: bf16
  has fp32's exponent range. In an fp16 run whose layers get no gradient while its fp32
  reference pass shows no vanishing (first/last weight-gradient ratio ≥
  `vanishing_weight_ratio`), the underflow is their cause: no vanishing_gradients finding,
  the fp16_underflow one names those layers (`flushed_layers`).

no_trainable_parameters: the model has no trainable tensor: error.

Healthy models (He-initialised MLP with LayerNorm, residual CNN with BatchNorm) stay clear of
every error-level rule; tests/unit/engine/test_pathologies*.py checks that on several seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.errors import BadInputError


@dataclass(frozen=True)
class Threshold:
    name: str
    default: float
    source: str
    meaning: str


THRESHOLDS: tuple[Threshold, ...] = (
    Threshold(
        "vanishing_profile_ratio",
        1e-3,
        "AUTOTRAINER (ICSE 2021) ratio, on ‖∂L/∂a‖",
        "depth ratio below it: vanishing (error)",
    ),
    Threshold(
        "vanishing_profile_ratio_warning",
        1e-2,
        "gradhealth",
        "depth ratio below it: vanishing (warning)",
    ),
    Threshold(
        "vanishing_weight_ratio",
        1e-3,
        "AUTOTRAINER (ICSE 2021)",
        "first/last weight-gradient ratio below it (with a small first norm): vanishing",
    ),
    Threshold(
        "vanishing_first_grad_norm",
        1e-4,
        "AUTOTRAINER (ICSE 2021)",
        "first layer's weight-gradient norm below it (with a small weight ratio): vanishing",
    ),
    Threshold(
        "vanishing_grad_to_weight",
        1e-7,
        "gradhealth",
        "every layer's grad/weight below it: vanishing at every depth (absolute scale)",
    ),
    Threshold(
        "exploding_profile_ratio",
        70.0,
        "AUTOTRAINER (ICSE 2021)",
        "depth (or weight) ratio above it: exploding (error)",
    ),
    Threshold(
        "exploding_profile_ratio_warning",
        10.0,
        "gradhealth",
        "depth ratio above it with compounding growth: exploding (warning)",
    ),
    Threshold(
        "exploding_layer_factor",
        1.3,
        "gradhealth",
        "fitted per-layer backward growth of ‖∂L/∂a‖ above it: the growth compounds",
    ),
    Threshold(
        "exploding_grad_to_weight",
        10.0,
        "gradhealth",
        "some layer's grad/weight above it: exploding (absolute scale)",
    ),
    Threshold(
        "target_scale_ratio",
        10.0,
        "gradhealth",
        "regression target RMS over the output's RMS (at least 1) at or above it: an exploding "
        "finding names the unstandardised target as its cause",
    ),
    Threshold(
        "vanishing_time_ratio",
        1e-3,
        "AUTOTRAINER ratio over time steps (Pascanu et al. 2013)",
        "first/last step gradient ratio below it: vanishing over time",
    ),
    Threshold(
        "exploding_time_ratio",
        70.0,
        "AUTOTRAINER ratio over time steps (Pascanu et al. 2013)",
        "first/last step gradient ratio above it: exploding over time",
    ),
    Threshold(
        "saturation_fraction_warning",
        0.2,
        "gradhealth (after Glorot & Bengio 2010)",
        "saturated share of a sigmoid/tanh layer at or above it: warning",
    ),
    Threshold(
        "saturation_fraction_error",
        0.5,
        "gradhealth (after Glorot & Bengio 2010)",
        "saturated share at or above it: error",
    ),
    Threshold(
        "dead_fraction_warning",
        0.4,
        "gradhealth (AUTOTRAINER also checks dying ReLU)",
        "dead share of a ReLU-like layer at or above it: warning",
    ),
    Threshold(
        "dead_fraction_error",
        0.7,
        "gradhealth (AUTOTRAINER also checks dying ReLU)",
        "dead share at or above it: error",
    ),
    Threshold(
        "quantizer_clipping_warning",
        0.01,
        "gradhealth (after Wu et al. 2020, calibration for integer quantization)",
        "share of a fake quantiser's input clamped by its range at or above it: warning",
    ),
    Threshold(
        "quantizer_clipping_error",
        0.1,
        "gradhealth",
        "clamped share at or above it: error",
    ),
    Threshold("init_ratio_low", 0.25, "He 2015 / Glorot 2010", "weight std / He|Xavier std below"),
    Threshold("init_ratio_high", 1.5, "He 2015 / Glorot 2010", "weight std / He|Xavier std above"),
    Threshold("init_ratio_error_low", 0.02, "gradhealth", "init ratio below it: error"),
    Threshold("init_ratio_error_high", 5.0, "gradhealth", "init ratio above it: error"),
    Threshold(
        "fp16_underflow_fraction",
        0.05,
        "gradhealth (after Micikevicius et al. 2018, mixed precision training)",
        "share of gradient entries that flush to zero in fp16 at or above it: warning in fp16 "
        "runs, info (a forecast) in fp32 runs",
    ),
    Threshold(
        "fp16_underflow_fraction_error",
        0.5,
        "gradhealth",
        "share at or above it while running in fp16: error",
    ),
)

DEFAULTS: dict[str, float] = {t.name: t.default for t in THRESHOLDS}


def resolve_thresholds(overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """The defaults with `overrides` applied; unknown names or non-numbers are refused."""
    values = dict(DEFAULTS)
    for name, value in (overrides or {}).items():
        if name not in DEFAULTS:
            known = ", ".join(sorted(DEFAULTS))
            raise BadInputError(f"unknown threshold {name!r}; known thresholds: {known}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadInputError(f"threshold {name!r} must be a number, got {value!r}")
        values[name] = float(value)
    return values
