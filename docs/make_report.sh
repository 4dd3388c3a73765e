#!/usr/bin/env bash
# Regenerates the experiment report on the embedded world (docs/report/, shown in docs/experiments.md) (about 15 minutes on 2 quiet CPU cores
# before the CoCoOp, IVLP and CLIP-LoRA rows were added; they add more, CLIP-LoRA's 500 steps per shot most):
# few-shot curves with the baselines (linear probe, CLAP, Tip-Adapter, Tip-Adapter-F), base-to-new with
# KgCoOp, domain shift, on colored_shapes with coopkit-tiny; CoCoOp, IVLP (text prompts) and CLIP-LoRA
# (text adapters) in all three.
#   bash docs/make_report.sh [OUT_DIR]        (needs the plot extra: pip install -e ".[plot]")
# To add a method to a report without running the others again, run its command below with
# --methods NEW --append: the rows of the other methods in OUT/results.csv are kept.
set -euo pipefail
export HF_HUB_OFFLINE=1
out=${1:-docs/report}
py=${PYTHON:-python}
world=$(mktemp -d)
trap 'rm -rf "$world"' EXIT
"$py" -c "from coopkit.embedded.world import write_task; write_task('colored_shapes', '$world/colored_shapes', shift='all')"
# a validation set for Tip-Adapter's alpha/beta search: 10 more images per class, drawn with another seed
"$py" -c "from coopkit.embedded.world import write_task; write_task('colored_shapes', '$world/val', shots_per_class=0, test_per_class=10, seed=1)"
W=$world/colored_shapes
base=$("$py" -c "from coopkit.embedded.world import base_new_split as b; print(','.join(b('colored_shapes')[0]))")
new=$("$py" -c "from coopkit.embedded.world import base_new_split as b; print(','.join(b('colored_shapes')[1]))")
# Whole-image training views (--no-augment): the world's 64-pixel scenes hold one object, which
# CoOp's random crops (scale 0.08-1) mostly cut away; see docs/embedded.md.
# The methods after CoOp on coopkit-tiny's ModifiedResNet image tower (docs/families.md): CoCoOp as
# it is; IVLP with text prompts only, in all 4 text layers; CLIP-LoRA with text adapters only.
# MaPLe and PromptSRC put prompts into the image transformer: refused on a ResNet tower, no rows.
new_methods="cocoop,ivlp,clip-lora"
text_only=(--set ivlp.prompt_depth_text=4 --set ivlp.prompt_depth_vision=0 --set ivlp.n_ctx_vision=0
           --set clip-lora.encoder=text)
"$py" -m coopkit bench fewshot --train "$W/train" --test "$W/test" --val "$world/val/test" --no-augment --n-views 1 -q \
    --methods zeroshot,zeroshot-ensemble,linear-probe,clap,tip-adapter,tip-adapter-f,coop,coop-csc,$new_methods \
    "${text_only[@]}" --out "$out/fewshot"
"$py" -m coopkit bench base2new --train "$W/train" --test "$W/test" --base "$base" --new "$new" \
    --kg-weight 0,1,8 --no-augment -q --methods zeroshot,coop,$new_methods "${text_only[@]}" --out "$out/base2new"
"$py" -m coopkit bench shift --train "$W/train" --test "source=$W/test" --test "sketch=$W/test_sketch" \
    --test "noise=$W/test_noise" --test "newbg=$W/test_newbg" --no-augment -q --methods zeroshot,coop,$new_methods \
    "${text_only[@]}" --out "$out/shift"

# --- multi-label (issue 24): zero-shot (positive vs negative prompt), CoOp with a sigmoid and DualCoOp on the
# world's default multi-label task (color_tags: scenes of 1-3 objects; labels: their colours), few-shot and partial labels;
# per-label thresholds chosen on the validation split. Writes $out/multilabel/.
mltask=$("$py" -c "from coopkit.embedded.world import DEFAULT_MULTILABEL_TASK as t; print(t)")
"$py" -c "from coopkit.embedded.world import write_multilabel_task as w; w('$mltask', '$world/$mltask')"
M=$world/$mltask
"$py" -m coopkit bench multilabel --train "$M/train.csv" --val "$M/val.csv" --test "$M/test.csv" \
    --shots 1,2,4,8,16 --known 0.1,0.3,0.5,1 -q --out "$out/multilabel"
