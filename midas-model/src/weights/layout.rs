//! How upstream's state-dict keys name this crate's parameters.
//!
//! Burn names a parameter by its field path; upstream's names come from `nn.Sequential` indices
//! and camel-case attributes. Each rename below is a prefix substitution, so it runs both ways:
//! upstream to Burn when loading a checkpoint, Burn to upstream when generating the synthetic
//! weights from the upstream keys. Keys no rule matches are already the same on both sides
//! (`scratch.layer1_rn.weight`, `scratch.refinenet2.out_conv.bias`,
//! `pretrained.model.blocks.3.attn.qkv.weight`, ...). The two models' upstream key sets do not
//! overlap where they are renamed, so one table serves both; Depth Anything V2's head, whose
//! Burn names would collide with MiDaS's, has its own table below `depth_head.`.

use crate::model::ModelKind;

/// `(upstream prefix, Burn prefix)` pairs of the MiDaS models.
const MIDAS_RENAMES: &[(&str, &str)] = &[
    // MiDaS wraps the backbone's pieces into `layer1`..`layer4` sequentials:
    // layer1 = [conv_stem, bn1, act1, blocks[0], blocks[1]], layer2 = [blocks[2]],
    // layer3 = [blocks[3], blocks[4]], layer4 = [blocks[5], blocks[6]].
    ("pretrained.layer1.0.", "pretrained.conv_stem."),
    ("pretrained.layer1.1.", "pretrained.bn1."),
    ("pretrained.layer1.3.0.", "pretrained.stem_block."),
    ("pretrained.layer1.4.", "pretrained.stages.0."),
    ("pretrained.layer2.0.", "pretrained.stages.1."),
    ("pretrained.layer3.0.", "pretrained.stages.2."),
    ("pretrained.layer3.1.", "pretrained.stages.3."),
    ("pretrained.layer4.0.", "pretrained.stages.4."),
    ("pretrained.layer4.1.", "pretrained.stages.5."),
    // DPT-Hybrid's reassembly sequentials: [readout, transpose, unflatten, 1x1 conv, 3x3 conv],
    // the readout itself a sequential [Linear, GELU].
    (
        "pretrained.act_postprocess3.0.project.0.",
        "pretrained.reassemble3.readout.",
    ),
    (
        "pretrained.act_postprocess3.3.",
        "pretrained.reassemble3.project.",
    ),
    (
        "pretrained.act_postprocess4.0.project.0.",
        "pretrained.reassemble4.readout.",
    ),
    (
        "pretrained.act_postprocess4.3.",
        "pretrained.reassemble4.project.",
    ),
    (
        "pretrained.act_postprocess4.4.",
        "pretrained.reassemble4.resample.",
    ),
    // The output head's sequential: [conv, interpolate, conv, relu, conv, relu, identity].
    ("scratch.output_conv.0.", "scratch.output_conv.conv1."),
    ("scratch.output_conv.2.", "scratch.output_conv.conv2."),
    ("scratch.output_conv.4.", "scratch.output_conv.conv3."),
];

/// `(upstream prefix, Burn prefix)` pairs of the fusion decoder every model shares (under
/// `depth_head.` in Depth Anything V2).
const SCRATCH_RENAMES: &[(&str, &str)] = &[
    // The fusion blocks' camel-case units.
    (
        "scratch.refinenet1.resConfUnit1.",
        "scratch.refinenet1.res_conf_unit1.",
    ),
    (
        "scratch.refinenet1.resConfUnit2.",
        "scratch.refinenet1.res_conf_unit2.",
    ),
    (
        "scratch.refinenet2.resConfUnit1.",
        "scratch.refinenet2.res_conf_unit1.",
    ),
    (
        "scratch.refinenet2.resConfUnit2.",
        "scratch.refinenet2.res_conf_unit2.",
    ),
    (
        "scratch.refinenet3.resConfUnit1.",
        "scratch.refinenet3.res_conf_unit1.",
    ),
    (
        "scratch.refinenet3.resConfUnit2.",
        "scratch.refinenet3.res_conf_unit2.",
    ),
    (
        "scratch.refinenet4.resConfUnit2.",
        "scratch.refinenet4.res_conf_unit2.",
    ),
];

/// Where Depth Anything V2's head lives; its keys are renamed below it.
const DEPTH_ANYTHING_HEAD: &str = "depth_head.";

/// `(upstream prefix, Burn prefix)` pairs of Depth Anything V2's head, below `depth_head.`.
const DEPTH_ANYTHING_RENAMES: &[(&str, &str)] = &[
    // `resize_layers`: [ConvTranspose 4x4, ConvTranspose 2x2, Identity, Conv 3x3 stride 2];
    // `projects` keeps its name.
    ("resize_layers.0.", "reassembly.upsample4."),
    ("resize_layers.1.", "reassembly.upsample2."),
    ("resize_layers.3.", "reassembly.downsample2."),
    ("projects.", "reassembly.projects."),
    // The output head: `output_conv1`, then the sequential `output_conv2` = [conv, ReLU, conv,
    // activation].
    ("scratch.output_conv1.", "scratch.output_conv.conv1."),
    ("scratch.output_conv2.0.", "scratch.output_conv.conv2."),
    ("scratch.output_conv2.2.", "scratch.output_conv.conv3."),
];

/// The upstream key whose presence identifies a model's state dict and reveals any prefix
/// before it: the first convolution of its encoder.
pub fn anchor_key(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::MidasV21Small256 => "pretrained.layer1.0.weight",
        ModelKind::DptHybrid384 => "pretrained.model.patch_embed.backbone.stem.conv.weight",
        ModelKind::DepthAnythingV2(..) => "pretrained.patch_embed.proj.weight",
    }
}

/// Prefixes fine-tuning scripts commonly leave on keys (`DataParallel`'s `module.`, Lightning's
/// `model.`), detected and removed automatically.
pub const KNOWN_PREFIXES: &[&str] = &["module.", "model."];

fn rename(key: &str, from_upstream: bool) -> String {
    if let Some(head_key) = key.strip_prefix(DEPTH_ANYTHING_HEAD) {
        let tables = [DEPTH_ANYTHING_RENAMES, SCRATCH_RENAMES];
        return format!(
            "{DEPTH_ANYTHING_HEAD}{}",
            rename_by(&tables, head_key, from_upstream)
        );
    }
    rename_by(&[MIDAS_RENAMES, SCRATCH_RENAMES], key, from_upstream)
}

/// The first matching prefix substitution of `tables`, or `key` as it is.
fn rename_by(tables: &[&[(&str, &str)]], key: &str, from_upstream: bool) -> String {
    for (upstream, burn) in tables.iter().flat_map(|table| table.iter()) {
        let (from, to) = if from_upstream {
            (upstream, burn)
        } else {
            (burn, upstream)
        };
        if let Some(rest) = key.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    key.to_string()
}

/// The Burn parameter path for an upstream key.
pub fn to_burn(upstream_key: &str) -> String {
    rename(upstream_key, true)
}

/// The upstream key for a Burn parameter path (BatchNorm's `gamma`/`beta` keep Burn's names;
/// see [`super::synthetic`] for where they become `weight`/`bias`).
pub fn to_upstream(burn_path: &str) -> String {
    rename(burn_path, false)
}

/// The upstream key a Burn parameter path is loaded from, leaf included: normalisation layers'
/// `gamma`/`beta` are upstream's `weight`/`bias`, except DINOv2's LayerScale (`ls1`, `ls2`),
/// whose factor upstream calls `gamma` too.
pub fn upstream_key(burn_path: &str) -> String {
    let upstream = to_upstream(burn_path);
    match upstream.rsplit_once('.') {
        Some((parent, "gamma")) if !(parent.ends_with(".ls1") || parent.ends_with(".ls2")) => {
            format!("{parent}.weight")
        }
        Some((parent, "beta")) => format!("{parent}.bias"),
        _ => upstream,
    }
}

/// Upstream keys that exist in every state dict but hold nothing the forward pass uses:
/// BatchNorm's step counters, the first residual unit of the deepest fusion block, which
/// upstream builds but never calls (it has no skip input), DPT's final ViT LayerNorm and
/// ImageNet classifier, whose results MiDaS discards, and DINOv2's mask token (training only).
pub fn is_unused_upstream_key(key: &str) -> bool {
    let key = key.strip_prefix(DEPTH_ANYTHING_HEAD).unwrap_or(key);
    key.ends_with(".num_batches_tracked")
        || key.starts_with("scratch.refinenet4.resConfUnit1.")
        || key.starts_with("pretrained.model.norm.")
        || key.starts_with("pretrained.model.head.")
        || key == "pretrained.mask_token"
}

/// Where `kind`'s state dict starts inside a flattened checkpoint: `""` for a bare state dict,
/// `"module."` for a `DataParallel` save, `"state_dict."` or `"model."` for a checkpoint dict
/// (nested dicts are flattened with `.`), or a combination of those (a Lightning checkpoint's
/// is `"state_dict.model."`). `None` if no key has `kind`'s anchor.
pub fn detect_prefix<'a>(
    kind: ModelKind,
    keys: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let anchor = anchor_key(kind);
    keys.into_iter()
        .filter_map(|key| key.strip_suffix(anchor))
        .filter(|prefix| prefix.is_empty() || prefix.ends_with('.'))
        .min_by_key(|prefix| prefix.len())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_round_trip() {
        for upstream in [
            "pretrained.layer1.0.weight",
            "pretrained.layer1.3.0.conv_dw.weight",
            "pretrained.layer4.1.0.bn3.running_var",
            "scratch.refinenet3.resConfUnit1.conv2.bias",
            "scratch.output_conv.4.weight",
            "scratch.layer2_rn.weight",
            "pretrained.act_postprocess4.4.bias",
            "pretrained.act_postprocess3.0.project.0.weight",
            "pretrained.model.patch_embed.backbone.stages.1.blocks.0.downsample.conv.weight",
            "depth_head.resize_layers.3.weight",
            "depth_head.projects.2.bias",
            "depth_head.scratch.output_conv2.2.weight",
            "depth_head.scratch.output_conv1.bias",
            "depth_head.scratch.refinenet2.resConfUnit1.conv1.weight",
            "depth_head.scratch.layer4_rn.weight",
            "pretrained.blocks.3.ls1.gamma",
        ] {
            assert_eq!(to_upstream(&to_burn(upstream)), upstream);
        }
        assert_eq!(
            to_burn("pretrained.layer3.1.2.conv_pw.weight"),
            "pretrained.stages.3.2.conv_pw.weight"
        );
        assert_eq!(
            to_burn("depth_head.scratch.output_conv2.0.weight"),
            "depth_head.scratch.output_conv.conv2.weight"
        );
        assert_eq!(
            to_upstream("depth_head.scratch.output_conv.conv1.weight"),
            "depth_head.scratch.output_conv1.weight"
        );
        assert_eq!(
            to_upstream("scratch.output_conv.conv1.weight"),
            "scratch.output_conv.0.weight"
        );
    }

    #[test]
    fn prefix_detection() {
        let small = ModelKind::MidasV21Small256;
        let keys = [
            "model.pretrained.layer1.0.weight",
            "model.scratch.layer1_rn.weight",
        ];
        assert_eq!(detect_prefix(small, keys), Some("model.".to_string()));
        assert_eq!(detect_prefix(ModelKind::DptHybrid384, keys), None);
        assert_eq!(
            detect_prefix(small, ["pretrained.layer1.0.weight"]),
            Some(String::new())
        );
        assert_eq!(
            detect_prefix(
                small,
                ["state_dict.module.pretrained.layer1.0.weight", "epoch"]
            ),
            Some("state_dict.module.".to_string())
        );
        assert_eq!(
            detect_prefix(small, ["xpretrained.layer1.0.weight", "fc.weight"]),
            None
        );
        assert_eq!(
            detect_prefix(
                ModelKind::DptHybrid384,
                ["state_dict.model.pretrained.model.patch_embed.backbone.stem.conv.weight"]
            ),
            Some("state_dict.model.".to_string())
        );
    }
}
