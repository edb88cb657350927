"""How tests/data/legacy_store was written: by featstore as it was at commit 47bf9bd (before the
modules moved into contract/format/store/encoders/build/ops), from the repository root of that
commit (it imports that layout: featstore.reader):

    python tests/data/legacy_store/make_legacy_store.py /tmp/legacy
    cp /tmp/legacy/store.lmdb/data.mdb /tmp/legacy/features.safetensors /tmp/legacy/fingerprints.json \
       tests/data/legacy_store/

Three feature sets of the sample images: vggt (vggt-tiny, bf16, the sample annotations), vggt_fp8
(vggt-tiny causal, last frame, float8_e4m3fn) and qwen_vision (qwen2.5-vl-vision-tiny); the
features each set served then (features.safetensors, "SET/KEY") and each set's fingerprint.
tests/test_legacy_store.py checks that today's code opens, verifies and serves them unchanged.
"""
import json, os, shutil, subprocess, sys
import torch
from safetensors.torch import save_file
out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True)
data = os.path.join(out, "data")
os.makedirs(data)
for scene in ("scene_a", "scene_b", "misc"):
    shutil.copytree(os.path.join("sample_data", scene), os.path.join(data, scene))
shutil.copy(os.path.join("sample_data", "annotations.json"), os.path.join(data, "annotations.json"))
def cli(*args):
    subprocess.run([sys.executable, "-m", "featstore", *args], check=True)
cli("build", "--data-root", data, "--annotations", os.path.join(data, "annotations.json"), "--encoder", "vggt-tiny", "--no-progress")
cli("build", "--data-root", data, "--encoder", "vggt-tiny", "--feature-set", "vggt_fp8", "--storage-dtype", "float8_e4m3fn",
    "--attention", "causal", "--frames-kept", "last", "--no-progress")
cli("build", "--data-root", data, "--encoder", "qwen2.5-vl-vision-tiny", "--no-progress")
store = os.path.join(data, "vggt_features.lmdb")
final = os.path.join(out, "store.lmdb")
cli("copy", store, final)
from featstore.reader import FeatureStore, feature_set_names
expected, specs = {}, {}
for name in feature_set_names(final):
    with FeatureStore(final, feature_set=name) as fs:
        specs[name] = fs.manifest["fingerprint"]
        for key in fs.keys():
            expected[f"{name}/{key}"] = fs.get(key, copy=True).features.contiguous()
save_file(expected, os.path.join(out, "features.safetensors"))
json.dump(specs, open(os.path.join(out, "fingerprints.json"), "w"), indent=1, sort_keys=True)
print(sorted(specs), len(expected))
