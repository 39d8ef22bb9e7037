#!/usr/bin/env python3
"""Writes starting corpora for the fuzz targets from the repository's fixtures (real ComfyUI
recordings, workflows, test_input.json) into fuzz/corpus/<target>/. Run from the repository root."""
import hashlib, json, os, pathlib, struct

root = pathlib.Path(__file__).resolve().parent.parent
corpus = root / "fuzz" / "corpus"

def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = corpus / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)

for p in sorted((root / "tests/fixtures/comfyui/transcripts").glob("*.json")):
    t = json.loads(p.read_text())
    for f in t.get("ws_frames", []):
        if f.get("opcode") == "text":
            put("ws_text", json.dumps(f["data"]))
    for h in t.get("http", []) + t.get("setup_http", []):
        if str(h.get("path", "")).startswith("/history/") and isinstance(h.get("body"), dict):
            put("history", json.dumps(h["body"]))
        if h.get("path") == "/prompt" and isinstance(h.get("request_body"), dict):
            put("job_input_bytes", json.dumps({"workflow": h["request_body"].get("prompt", {})}))

for p in sorted((root / "tests/fixtures/comfyui/workflows").glob("*.json")):
    put("job_input_bytes", json.dumps({"workflow": json.loads(p.read_text())}))
ti = json.loads((root / "test_input.json").read_text())
put("job_input_bytes", json.dumps(ti["input"]))
put("job_input_bytes", json.dumps({"workflow": {"1": {"class_type": "LoadImage", "inputs": {}}},
    "images": [{"name": "a.png", "image": "data:image/png;base64,aGk=", "subfolder": "x/y"},
               {"image": "https://example.com/a%20b.png"},
               {"name": "m.png", "image": "aGk=", "kind": "mask", "original_ref": "a.png"}],
    "output": {"include_temp": True, "kinds": ["images", "videos"]}}))

for p in sorted((root / "tests/fixtures/ui_workflows").glob("*.json")):
    if not p.name.endswith(".api.json"):
        put("ui_workflow", p.read_text())

png = bytes.fromhex("89504e470d0a1a0a") + b"\0" * 16
put("ws_binary", struct.pack(">II", 1, 2) + png)
put("ws_binary", struct.pack(">II", 1, 1) + b"\xff\xd8\xff\xe0" + b"\0" * 8)
put("ws_binary", struct.pack(">II", 3, 1) + b"9" + b"some text")
meta = json.dumps({"node_id": "3", "prompt_id": "p", "display_node_id": "3", "image_type": "image/png"}).encode()
put("ws_binary", struct.pack(">II", 4, len(meta)) + meta + png)
put("ws_binary", struct.pack(">I", 2) + png)
