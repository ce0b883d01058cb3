from infoquant_export.artifact import is_artifact
from infoquant_export.pipeline import load_for_eval
from tests.export.conftest import make_artifact
from tests.helpers import save_tiny_model_dir


def test_hf_directory_is_not_an_artifact(tmp_path):
    hf = save_tiny_model_dir(tmp_path / "hf")
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    assert not is_artifact(hf)
    assert is_artifact(make_artifact(tmp_path))
    _, _, label = load_for_eval(str(hf), "cpu")
    assert label == "FP"  # eval --model HF_DIR / eval HF_DIR load the full-precision model
