"""MkDocs hook: fills docs/cli.md with the help of every `sparsa` command, from the argparse parser."""

import argparse

MARKER = "<!-- cli-reference -->"


def _sections(parser: argparse.ArgumentParser, name: str) -> list[str]:
    sections = [f"## `{name}`\n\n```text\n{parser.format_help()}```\n"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                sections += _sections(subparser, f"{name} {command}")
    return sections


def on_page_markdown(markdown: str, page, **_) -> str:
    if MARKER not in markdown:
        return markdown
    from sparsa.cli import build_parser

    return markdown.replace(MARKER, "\n".join(_sections(build_parser(), "sparsa")))
