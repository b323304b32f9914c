"""Server-rendered HTML pages (no JavaScript, no assets from the network).

`report_page.render_page(view)` turns a diagnosis row's data into one self-contained page:
inline CSS (`layout.py`) and inline SVG charts (`svg_charts.py`) drawn from the report in
Python. Every string that came from a user or a model file goes through `layout.esc`.
"""
