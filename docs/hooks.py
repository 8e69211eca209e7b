"""mkdocs hooks (see mkdocs.yml): the site's home page is the repository's README.md.

README.md links into the documentation as `docs/PAGE.md` (right on GitHub); on the site the same
pages are `PAGE.md`, so those links lose their `docs/` prefix here. Everything else is README.md as
it is: one front page, one source.
"""

from __future__ import annotations

import re
from pathlib import Path

_DOCS_LINK = re.compile(r"\]\(docs/")


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "index.md":
        return markdown
    readme = Path(config["config_file_path"]).parent / "README.md"
    return _DOCS_LINK.sub("](", readme.read_text(encoding="utf-8"))
