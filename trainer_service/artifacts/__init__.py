"""Artifacts a trainer makes from catalog models without training: merged adapters, GGUF exports.

- `converter`: llama.cpp's own converter (`convert_hf_to_gguf.py`, from the llama-cpp-python
  release's source, installed by `scripts/setup.sh`) and quantizer
  (`llama_cpp.llama_model_quantize`), and which architectures the converter knows (its
  `ModelBase` registry of model classes).
- `tools`: what runs in child processes (`python -m trainer_service.artifacts.tools`): the
  peft merge, the quantizer, the converter's registry probe.
- `service`: `ArtifactManager`, the domain class behind the `MergeAdapter` and `ExportModel`
  RPCs: checks first, then the work, then the catalog registration.
"""
