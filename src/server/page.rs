//! The welcome page at `GET /`: what is running, with which weights, and a form to try it.

use super::ModelInfo;
use crate::config::ServeArgs;
use crate::pipeline::Colormap;
use crate::storage::Store;

const TEMPLATE: &str = include_str!("page.html");

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// Fills the page template.
pub fn render(model: &ModelInfo, store: &Store, config: &ServeArgs) -> String {
    let weights = &model.weights;
    let warning = if weights.untrained {
        "<p class=\"warning\" id=\"untrained\">Warning: no weights were given, so this server runs the untrained, \
         deterministically initialised model. Its depth maps are meaningless. Start it with <code>--weights</code> \
         (a MiDaS v2.1 small or DPT-Hybrid <code>.pt</code>, <code>.ckpt</code>, <code>.safetensors</code> or \
         <code>.bpk</code>).</p>"
            .to_string()
    } else {
        String::new()
    };
    let backend = match &model.adapter {
        Some(adapter) => format!(
            "{} on {} ({}, {}, {})",
            model.backend, adapter.name, adapter.device_type, adapter.api, adapter.driver
        ),
        None => model.backend.to_string(),
    };
    let source = if weights.untrained {
        "untrained deterministic weights (synthetic)"
    } else {
        &weights.source
    };
    let limits = format!(
        "{} MiB per upload, {} megapixels per image",
        config.max_body_bytes >> 20,
        config.image.max_pixels as f64 / 1e6
    );
    let colormaps: String = Colormap::ALL
        .iter()
        .map(|colormap| {
            let selected = if *colormap == config.default_colormap {
                " selected"
            } else {
                ""
            };
            format!("<option{selected}>{}</option>", colormap.name())
        })
        .collect();
    TEMPLATE
        .replace("{{WARNING}}", &warning)
        .replace("{{MODEL}}", &escape(model.kind.description()))
        .replace("{{TRANSFORM}}", model.transform.name())
        .replace("{{COLORMAPS}}", &colormaps)
        .replace("{{BACKEND}}", &escape(&backend))
        .replace("{{WEIGHTS}}", &escape(source))
        .replace(
            "{{SHA256}}",
            &escape(weights.sha256.as_deref().unwrap_or("none")),
        )
        .replace("{{STORE}}", &escape(&store.describe()))
        .replace("{{LIMITS}}", &escape(&limits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
