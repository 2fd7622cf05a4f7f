"""Trainers: stage 1 experts (`expert`), stage 2 fusion (`fuse`), shared loop pieces (`common`)."""
