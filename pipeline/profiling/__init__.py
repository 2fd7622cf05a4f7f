"""Expert-load profiling of a fused model (which experts each task activates); entry point `stage.profile_model_dir`."""
