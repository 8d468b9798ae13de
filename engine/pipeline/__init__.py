"""Image-to-video pipeline: preprocess -> condition -> sample -> decode -> save."""
