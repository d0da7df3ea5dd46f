//! Models people can use elsewhere: a Cohort checkpoint with LoRA adapters, exported with
//! `cohort-coordinator export-hf` (merged, and as a PEFT adapter), loads in transformers
//! and PEFT and gives Cohort's own logits (`cohort-worker logits`); a model that
//! transformers saved imports with `import-hf` and gives transformers' logits in Cohort;
//! import(export(x)) is x bit for bit; pretraining starts from `train.init_checkpoint`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cohort_core::model::{ModelConfig, TensorSpec};
use cohort_core::params::{init_params, ParamLayout};
use cohort_tests::{binary, DataOptions, Job, TINY_MODEL};
use safetensors::tensor::{Dtype, TensorView};

/// f32 logits of the same model on the same tokens: differences come only from the order
/// of floating-point operations.
const TOLERANCE: f32 = 1e-4;

const LORA_ALPHA: f64 = 8.0;
const LORA_RANK: u32 = 4;

/// Loads the merged export with transformers, the PEFT export with PEFT, and saves a
/// random GPT-2 of the tiny preset's shape with `save_pretrained`; writes their logits
/// on the tokens as JSON.
const PYTHON: &str = r#"
import json, sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from peft import PeftModel

merged_dir, peft_dir, saved_dir, tokens, out = sys.argv[1:]
ids = torch.tensor([[int(t) for t in tokens.split(",")]])

def logits(model):
    model.eval()
    with torch.no_grad():
        return model(ids).logits[0].tolist()

merged = GPT2LMHeadModel.from_pretrained(merged_dir, dtype=torch.float32)
assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr(), "tied"
base = GPT2LMHeadModel.from_pretrained(peft_dir + "/base", dtype=torch.float32)
adapted = PeftModel.from_pretrained(base, peft_dir)
config = adapted.peft_config["default"]
peft_tensors = {
    name: list(param.shape)
    for name, param in adapted.named_parameters()
    if "lora_" in name
}

torch.manual_seed(0)
saved = GPT2LMHeadModel(GPT2Config(
    vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
))
with torch.no_grad():
    for param in saved.parameters():
        param.add_(torch.randn_like(param) * 0.1)
saved.save_pretrained(saved_dir)

json.dump({
    "transformers": __import__("transformers").__version__,
    "peft": __import__("peft").__version__,
    "merged": logits(merged),
    "peft_logits": logits(adapted),
    "peft_r": config.r,
    "peft_alpha": config.lora_alpha,
    "peft_fan_in_fan_out": config.fan_in_fan_out,
    "peft_tensors": peft_tensors,
    "saved": logits(saved),
}, open(out, "w"))
"#;

fn python() -> PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map(|venv| Path::new(&venv).join("bin/python"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Runs `program args`, panicking with its output unless it succeeds; returns stdout.
fn run(program: &Path, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} {} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        program.display(),
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Writes `values` (laid out as `specs`) as a Cohort checkpoint.
fn write_checkpoint(file: &Path, specs: &[TensorSpec], values: &[f32]) {
    let layout = ParamLayout::new(specs);
    let bytes: &[u8] = bytemuck::cast_slice(values);
    let views: Vec<(String, TensorView)> = layout
        .tensors()
        .iter()
        .map(|slot| {
            let data = &bytes[slot.offset * 4..(slot.offset + slot.numel) * 4];
            let view = TensorView::new(Dtype::F32, slot.shape.clone(), data).expect("view");
            (slot.name.clone(), view)
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, file).expect("write checkpoint");
}

fn read_tensors(file: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(file).expect("read safetensors");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

fn logits_from_json(value: &serde_json::Value) -> Vec<Vec<f32>> {
    serde_json::from_value(value.clone()).expect("logits are [[f32]]")
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "positions");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "vocabulary");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Cohort's logits from `cohort-worker logits`.
fn cohort_logits(checkpoint: &Path, adapters: Option<&Path>, tokens: &str) -> Vec<Vec<f32>> {
    let alpha = LORA_ALPHA.to_string();
    let mut args = vec![
        "logits",
        "--model",
        "tiny",
        "--checkpoint",
        path(checkpoint),
    ];
    if let Some(adapters) = adapters {
        args.extend(["--lora-adapters", path(adapters), "--lora-alpha", &alpha]);
    }
    args.extend(["--tokens", tokens]);
    let stdout = run(&binary("cohort-worker"), &args);
    serde_json::from_str(&stdout).expect("logits JSON")
}

/// Parameters large enough that the logits spread over several units, with every bias
/// and LayerNorm away from its initial value, so that a misplaced tensor shows.
fn base_params(model: &ModelConfig) -> Vec<f32> {
    let specs = model.tensor_specs();
    let mut values = init_params(&specs, 11);
    for slot in ParamLayout::new(&specs).tensors() {
        for (i, v) in values[slot.offset..slot.offset + slot.numel]
            .iter_mut()
            .enumerate()
        {
            let wobble = ((slot.offset + i) as f32 * 0.73).sin() * 0.1;
            *v = if slot.name.contains("ln_") && slot.name.ends_with(".weight") {
                1.0 + wobble
            } else if slot.shape.len() == 1 {
                wobble
            } else {
                *v * 4.0
            };
        }
    }
    values
}

/// Adapters whose B is nonzero (at initialisation B = 0 and they would add nothing).
fn adapter_params(model: &ModelConfig) -> Vec<f32> {
    let specs = model.lora_specs(LORA_RANK);
    let mut values = init_params(&specs, 12);
    for slot in ParamLayout::new(&specs).tensors() {
        if slot.name.ends_with(".lora_b") {
            for (i, v) in values[slot.offset..slot.offset + slot.numel]
                .iter_mut()
                .enumerate()
            {
                *v = ((slot.offset + i) as f32 * 0.37).sin() * 0.05;
            }
        }
    }
    values
}

#[test]
fn exported_models_give_cohorts_logits_in_transformers_and_peft() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = ModelConfig::tiny_byte_level();
    let base = dir.path().join("base.safetensors");
    let adapters = dir.path().join("adapters.safetensors");
    let base_values = base_params(&model);
    write_checkpoint(&base, &model.tensor_specs(), &base_values);
    write_checkpoint(
        &adapters,
        &model.lora_specs(LORA_RANK),
        &adapter_params(&model),
    );
    let coordinator = binary("cohort-coordinator");
    let merged = dir.path().join("merged");
    let peft = dir.path().join("peft");
    let alpha = LORA_ALPHA.to_string();
    for (out, extra) in [(&merged, None), (&peft, Some("--as-peft"))] {
        let mut args = vec![
            "export-hf",
            "--model",
            "tiny",
            "--checkpoint",
            path(&base),
            "--lora-adapters",
            path(&adapters),
            "--lora-alpha",
            &alpha,
            "--out",
            path(out),
        ];
        args.extend(extra);
        run(&coordinator, &args);
    }
    assert!(merged.join("config.json").exists() && merged.join("model.safetensors").exists());
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "base/model.safetensors",
    ] {
        assert!(peft.join(file).exists(), "{file}");
    }

    // Every position of the context, and every byte value somewhere.
    let tokens: Vec<String> = (0..64).map(|i| ((i * 37 + 5) % 256).to_string()).collect();
    let tokens = tokens.join(",");
    let saved = dir.path().join("saved-by-transformers");
    let results = dir.path().join("python.json");
    let script = dir.path().join("check.py");
    std::fs::write(&script, PYTHON).expect("write script");
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import transformers, peft"])
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
    assert!(
        probe.status.success(),
        "transformers and peft are not importable from {} (run scripts/bootstrap.sh): {}",
        python.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    run(
        &python,
        &[
            path(&script),
            path(&merged),
            path(&peft),
            path(&saved),
            &tokens,
            path(&results),
        ],
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&results).expect("python results")).expect("JSON");

    let cohort = cohort_logits(&base, Some(&adapters), &tokens);
    let without_adapters = cohort_logits(&base, None, &tokens);
    let spread = cohort.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let adapters_matter = max_abs_diff(&cohort, &without_adapters);
    let merged_diff = max_abs_diff(&logits_from_json(&results["merged"]), &cohort);
    let peft_diff = max_abs_diff(&logits_from_json(&results["peft_logits"]), &cohort);
    eprintln!(
        "transformers {} / peft {}: max |logit| {spread:.3}, adapters move logits by up to \
         {adapters_matter:.3}; max |Δlogit| merged {merged_diff:.2e}, PEFT {peft_diff:.2e}",
        results["transformers"], results["peft"]
    );
    assert!(spread > 1.0, "logits too flat to test anything: {spread}");
    assert!(
        adapters_matter > 0.1,
        "the adapters must matter: {adapters_matter}"
    );
    assert!(
        merged_diff < TOLERANCE,
        "merged export: max |Δlogit| {merged_diff}"
    );
    assert!(
        peft_diff < TOLERANCE,
        "PEFT export: max |Δlogit| {peft_diff}"
    );
    assert_eq!(results["peft_r"], LORA_RANK);
    assert_eq!(results["peft_alpha"], LORA_ALPHA);
    assert_eq!(results["peft_fan_in_fan_out"], true);
    // PEFT's A is [r, in] and B [out, r] on the Conv1D layers, as Cohort's.
    let peft_tensors = results["peft_tensors"].as_object().expect("tensor map");
    assert_eq!(peft_tensors.len(), model.lora_specs(LORA_RANK).len());
    assert_eq!(
        peft_tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_A.default.weight"],
        serde_json::json!([4, 64])
    );
    assert_eq!(
        peft_tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_B.default.weight"],
        serde_json::json!([256, 4])
    );

    // A model saved by transformers itself imports and runs in Cohort.
    let imported = dir.path().join("imported.safetensors");
    let section = run(
        &coordinator,
        &[
            "import-hf",
            "--hf-dir",
            path(&saved),
            "--out",
            path(&imported),
        ],
    );
    assert!(section.contains("d_model = 64"), "{section}");
    let saved_diff = max_abs_diff(
        &cohort_logits(&imported, None, &tokens),
        &logits_from_json(&results["saved"]),
    );
    eprintln!("saved by transformers, imported: max |Δlogit| {saved_diff:.2e}");
    assert!(
        saved_diff < TOLERANCE,
        "imported model: max |Δlogit| {saved_diff}"
    );

    // import(export(x)) == x, bit for bit (the PEFT export's base is x exported).
    let round_trip = dir.path().join("round-trip.safetensors");
    run(
        &coordinator,
        &[
            "import-hf",
            "--hf-dir",
            path(&peft.join("base")),
            "--out",
            path(&round_trip),
        ],
    );
    let original = read_tensors(&base);
    let back = read_tensors(&round_trip);
    assert_eq!(original.len(), back.len());
    for (name, (shape, values)) in &original {
        let (back_shape, back_values) = &back[name];
        assert_eq!(shape, back_shape, "{name}");
        assert!(
            values
                .iter()
                .zip(back_values)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} changed in the round trip"
        );
    }
    let layout = ParamLayout::new(&model.tensor_specs());
    assert_eq!(layout.total(), base_values.len());
}

#[test]
fn pretraining_starts_from_an_init_checkpoint() {
    let mut job = Job::new(DataOptions {
        context_length: 32,
        shard_tokens: 4096,
        val_every: 10,
    });
    // TINY_MODEL, with parameters that are not the job's seeded initialisation.
    let model = ModelConfig {
        vocab_size: 256,
        context_length: 32,
        n_layer: 1,
        n_head: 2,
        d_model: 32,
        dropout: 0.0,
    };
    let specs = model.tensor_specs();
    let init: Vec<f32> = init_params(&specs, 99).iter().map(|v| v * 3.0).collect();
    write_checkpoint(&job.path("init.safetensors"), &specs, &init);
    job.write_job(&format!(
        r#"
name = "e2e-init-checkpoint"
{TINY_MODEL}
[train]
rounds = 1
inner_steps = 1
micro_batch_size = 4
init_checkpoint = "init.safetensors"
[inner]
kind = "sgd"
lr = 1e-9
beta1 = 0.0
beta2 = 0.0
eps = 1e-8
weight_decay = 0.0
grad_clip = 1.0
warmup_steps = 0
[outer]
kind = "sgd"
lr = 1.0
[cluster]
min_workers = 1
min_participants = 1
"#
    ));
    job.start_coordinator();
    job.start_worker(&[]);
    job.wait_all(Duration::from_secs(120));
    // One step of lr 1e-9 later, the model is still the init checkpoint.
    let layout = ParamLayout::new(&specs);
    let checkpoint = job.checkpoint();
    assert_eq!(checkpoint.len(), specs.len());
    for (name, shape, values) in checkpoint {
        let slot = layout
            .tensors()
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("unexpected tensor {name}"));
        assert_eq!(shape, slot.shape, "{name}");
        let want = &init[slot.offset..slot.offset + slot.numel];
        let diff = values
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff < 1e-5,
            "{name} moved by {diff} from the init checkpoint"
        );
    }
}
