"""The framework-neutral core of the training side: one generation's runtime
(`runtime`), its collective engine, gradient channel and transport, the worker's
membership (`worker`), and the process's session shared by every frontend (`session`).
See docs/architecture.md."""
