"""Adapters tab: the library at a glance, its load errors, and importing a peft adapter."""

from __future__ import annotations

import gradio as gr

from fusion.adapters import ALL_MODULES
from fusion.api import Backend

from .common import TOAST_SECONDS, Studio, error_line

HEADERS = ["name", "kind", "role", "rank / alpha", "targets", "base model", "MB", "description"]
# Fixed widths: a narrow window scrolls the table sideways instead of breaking words mid-letter.
WIDTHS = ["130px", "80px", "90px", "70px", "150px", "180px", "60px", "440px"]
CONFIRM_DELETE = "(choice) => (choice && confirm(`Delete ${choice.replace(':', ' ')}?`)) ? choice : null"
ROLES = [("guess from the name (lang-…, task-…)", ""), ("language", "language"), ("task", "task"), ("other", "other")]


def library_rows(engine: Backend) -> list[list]:
    rows = []
    for a in engine.adapters():
        alpha = a.get("alpha")
        rows.append(
            [
                a["name"],
                a.get("kind", "lora"),
                a.get("role", ""),
                f"{a.get('rank')} / {int(alpha) if alpha is not None and float(alpha).is_integer() else alpha}",
                targets_text(a.get("targets") or []),
                base_model_name(a.get("base_model") or ""),
                round((a.get("size_bytes") or 0) / 1e6, 2),
                a.get("description") or "",
            ]
        )
    return rows


def targets_text(targets: list[str]) -> str:
    if set(targets) == set(ALL_MODULES):
        return "all 7 projections"
    return ", ".join(targets)


def base_model_name(value: str) -> str:
    """A hub id as it is; a local folder (e.g. a cache path) by its model name only."""
    if not value.startswith(("/", "~", ".")) and value.count("/") <= 1:
        return value
    parts = [p for p in value.replace("\\", "/").split("/") if p]
    for part in reversed(parts):  # hub caches name their folders models--org--name
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return parts[-1] if parts else value


def fusion_rows(engine: Backend) -> list[list]:
    return [
        [f["name"], f["method"], ", ".join(f["adapters"]), f["meta"].get("examples"), f["meta"].get("seconds")]
        for f in engine.fusions()
    ]


def removable_choices(engine: Backend) -> list:
    """(label, "kind:name") for the delete picker: fusions first, as adapters in use cannot go."""
    return [(f"fusion · {f['name']}", f"fusion:{f['name']}") for f in engine.fusions()] + [
        (f"adapter · {a['name']}", f"adapter:{a['name']}") for a in engine.adapters()
    ]


def errors_text(engine: Backend) -> str:
    errors = engine.library_errors()
    if not errors:
        return "No load errors."
    return "**Could not load:**\n" + "\n".join(f"- `{name}`: {message}" for name, message in errors.items())


def build_adapters_tab(studio: Studio) -> dict:
    engine = studio.engine
    folders = engine.library_folders()
    with gr.Tab("Adapters", id="adapters"):
        gr.Markdown(
            f"Library folder: `{folders.adapters}` · fitted fusions: `{folders.fusions}`", elem_classes=["param-note"]
        )
        table = gr.Dataframe(
            library_rows(engine),
            headers=HEADERS,
            interactive=False,
            wrap=True,
            max_height=720,
            column_widths=WIDTHS,
            label="LoRA library",
            elem_id="adapters-table",
        )
        fusions = gr.Dataframe(
            fusion_rows(engine),
            headers=["name", "method", "adapters", "examples", "seconds"],
            interactive=False,
            label="Saved fitted fusions",
            elem_id="fusions-table",
        )
        errors = gr.Markdown(errors_text(engine), elem_id="adapters-errors")
        with gr.Row(equal_height=False):
            doomed = gr.Dropdown(
                removable_choices(engine),
                value=None,
                label="Delete from the library",
                info="A saved fusion, or an adapter no saved fusion uses",
                scale=3,
                elem_id="delete-dd",
            )
            delete = gr.Button("Delete", variant="stop", scale=0, min_width=120, elem_id="delete-btn")
        refresh = gr.Button("Rescan the library folder", size="sm", elem_id="refresh-btn")
        with gr.Accordion("Import a peft LoRA adapter", open=True):
            gr.Markdown(
                "A folder with `adapter_config.json` and `adapter_model.safetensors` (or `.bin`), given as a "
                "path on the server or uploaded as a zip. It is checked against the base model before it "
                "is copied in.",
                elem_classes=["param-note"],
            )
            with gr.Row():
                path = gr.Textbox(label="Folder or zip path on the server", scale=3, elem_id="import-path")
                upload = gr.File(
                    label="…or upload a zip",
                    file_types=[".zip"],
                    type="filepath",
                    height=120,
                    scale=2,
                    elem_id="import-zip",
                )
            with gr.Row():
                name = gr.Textbox(
                    label="Name in the library", placeholder="empty = folder or zip name", elem_id="import-name"
                )
                role = gr.Dropdown(ROLES, value="", label="Role", elem_id="import-role")
                overwrite = gr.Checkbox(
                    value=False, label="Replace an adapter of that name", elem_id="import-overwrite"
                )
            go = gr.Button("Import", variant="primary", elem_id="import-btn")
            status = gr.Markdown(elem_id="import-status", elem_classes=["status-line"])

    def refreshed():
        return library_rows(engine), fusion_rows(engine), errors_text(engine)

    def rescan():
        engine.rescan()
        return (
            *refreshed(),
            gr.skip(),
            gr.skip(),
            f"Rescanned: {len(engine.adapters())} adapters, {len(engine.fusions())} fusions.",
        )

    def import_adapter(folder, archive, new_name, new_role, replace):
        """Outputs: the three library views, the path box, the upload box, the status line."""
        folder = (folder or "").strip()
        problem = (
            "Give a folder path or upload a zip."
            if not (archive or folder)
            else "Give a folder path or a zip, not both: clear one of them."
            if archive and folder
            else None
        )
        if problem:
            gr.Warning(problem, duration=TOAST_SECONDS)
            return *refreshed(), gr.skip(), gr.skip(), f"⚠ {problem}"
        try:
            adapter = engine.import_adapter(
                archive or folder, name=(new_name or "").strip() or None, role=new_role or None, overwrite=bool(replace)
            )
        except Exception as exc:
            line = error_line(exc)
            gr.Warning(line, duration=TOAST_SECONDS)
            return *refreshed(), gr.skip(), gr.skip(), f"⚠ {line}"
        # Emptied after an import, so the next one cannot silently reuse this source.
        return (
            *refreshed(),
            "",
            None,
            f"✔ Imported **{adapter['name']}** (role {adapter['role']}, rank {adapter['rank']}).",
        )

    def remove(choice):
        """Outputs as import_adapter's, then the delete picker."""
        if not choice:
            return *refreshed(), gr.skip(), gr.skip(), "Pick what to delete first.", gr.skip()
        kind, _, entry = str(choice).partition(":")
        try:
            engine.remove(entry, kind)
        except Exception as exc:
            line = error_line(exc)
            gr.Warning(line, duration=TOAST_SECONDS)
            return *refreshed(), gr.skip(), gr.skip(), f"⚠ {line}", gr.skip()
        return (
            *refreshed(),
            gr.skip(),
            gr.skip(),
            f"✔ Deleted the {kind} **{entry}**.",
            gr.update(choices=removable_choices(engine), value=None),
        )

    outputs = [table, fusions, errors, path, upload, status]
    refresh_event = refresh.click(rescan, None, outputs, api_visibility="private")
    # The browser asks first; a dismissed question sends nothing to delete.
    delete_event = delete.click(
        remove, doomed, outputs + [doomed], api_visibility="private", concurrency_id="library", js=CONFIRM_DELETE
    )
    import_event = go.click(
        import_adapter,
        [path, upload, name, role, overwrite],
        outputs,
        api_visibility="private",
        concurrency_id="library",
    )
    return {
        "events": [refresh_event, import_event, delete_event],
        "table": table,
        "fusions": fusions,
        "errors": errors,
        "delete": doomed,
    }
