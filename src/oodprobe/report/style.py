"""The report's inline stylesheet (no web fonts, no external resources)."""

from __future__ import annotations

__all__ = ["CSS"]

CSS = """
:root {
  --ink: #1f2937; --muted: #6b7280; --line: #e5e7eb; --panel: #f8fafc; --accent: #2f6fde;
  --best: #e3f4e8; --best-ink: #14532d; --near: #fff4e0; --near-ink: #8a4b00;
  --far: #e6f2fb; --far-ink: #0b4f7c;
}
* { box-sizing: border-box; }
body {
  margin: 0; color: var(--ink); background: #fff;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
}
main { max-width: 1320px; margin: 0 auto; padding: 28px 32px 48px; }
header { border-bottom: 1px solid var(--line); padding-bottom: 14px; margin-bottom: 22px; }
h1 { font-size: 24px; margin: 0 0 6px; letter-spacing: -0.01em; }
h2 {
  font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line);
}
h3 { font-size: 15px; margin: 20px 0 8px; }
h3 code, h2 code { font-size: 0.95em; }
code, pre, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
code { background: var(--panel); padding: 1px 4px; border-radius: 4px; font-size: 0.92em; }
.summary { color: var(--muted); margin: 0; font-size: 15px; }
.summary strong { color: var(--ink); }
nav { margin-top: 10px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
.results-layout { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.results-tables { flex: 1 1 720px; min-width: 0; }
.stacked .results-tables { flex-basis: 100%; }
.stacked .convention { flex: 1 1 100%; order: -1; }
.stacked .convention dl { grid-template-columns: auto 1fr auto 1fr auto 1fr; }
.convention {
  flex: 0 1 300px; background: var(--panel); border: 1px solid var(--line);
  border-left: 4px solid var(--accent); border-radius: 8px; padding: 12px 14px; font-size: 13px;
}
.convention h3 { margin: 0 0 6px; font-size: 14px; }
.convention p { margin: 4px 0; }
.convention dl { margin: 8px 0 0; display: grid; grid-template-columns: auto 1fr; gap: 2px 10px; }
.convention dt { color: var(--muted); }
.convention dd { margin: 0; }
.table-wrap { overflow-x: auto; margin-bottom: 8px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 5px 7px; border-bottom: 1px solid var(--line); }
thead th { background: var(--panel); font-weight: 600; text-align: center; white-space: nowrap; }
thead tr.sub th { font-weight: 500; color: var(--muted); font-size: 11.5px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.det, th.det { text-align: left; }
td.det .params { display: block; color: var(--muted); font-size: 11px; max-width: 260px; }
td.best { background: var(--best); color: var(--best-ink); font-weight: 700; }
td.mean, th.mean { background: #fafafa; }
td.best.mean { background: var(--best); }
.ci { display: block; color: var(--muted); font-size: 11px; font-weight: 400; }
td.best .ci { color: var(--best-ink); }
th.split, td.split { border-left: 1px solid var(--line); }
.badge {
  display: inline-block; font-size: 10px; font-weight: 600; padding: 0 6px; border-radius: 9px;
  margin-left: 4px; text-transform: uppercase; letter-spacing: 0.03em; vertical-align: 1px;
}
.badge.near { background: var(--near); color: var(--near-ink); }
.badge.far { background: var(--far); color: var(--far-ink); }
.badge.mean { background: #eef0f3; color: var(--muted); }
.note { color: var(--muted); font-size: 12px; margin: 4px 0 0; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; }
figure {
  margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: #fff;
}
figure img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 4px; }
figcaption strong { color: var(--ink); }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(124px, 1fr)); gap: 10px; }
.thumb { border: 1px solid var(--line); border-radius: 6px; padding: 6px; text-align: center; }
.thumb .frame {
  height: 96px; display: flex; align-items: center; justify-content: center; background: #f3f4f6;
  border-radius: 4px;
}
.thumb img { image-rendering: pixelated; max-width: 96px; max-height: 96px; }
.thumb .cap { font-size: 10.5px; margin-top: 4px; overflow-wrap: anywhere; line-height: 1.3; }
.thumb .score { font-size: 11px; color: var(--muted); font-variant-numeric: tabular-nums; }
.gallery-meta { color: var(--muted); font-size: 12px; margin: -4px 0 8px; }
details { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; margin: 10px 0; }
details > summary { cursor: pointer; font-weight: 600; }
details pre {
  background: var(--panel); padding: 10px; border-radius: 6px; overflow-x: auto; font-size: 12px;
  white-space: pre-wrap; word-break: break-word;
}
table.kv td { vertical-align: top; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.long td { font-size: 12px; }
table.long td.extra {
  font-size: 11px; color: var(--muted); max-width: 520px; overflow-wrap: anywhere; text-align: left;
}
table.long td.extra .key { color: var(--ink); }
.study-meta { margin: 0 0 4px; }
figure.study-fit { flex: 0 1 600px; }
figure.study-fit .fit-note { color: #8a4b00; margin-top: 2px; }
table.study td.note-cell { font-size: 12px; color: var(--muted); max-width: 320px; }
table.study td code { white-space: nowrap; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""
