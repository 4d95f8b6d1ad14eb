"""The web app's tabs, one `build_*_tab()` per module, over the `fusion` engine."""
