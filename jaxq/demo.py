"""`make demo`: the README's main job on the embedded default model (SmolLM2-135M-Instruct)."""


def main() -> None:
    print("jaxq demo: model loading and generation are not yet implemented (issue 3).")


if __name__ == "__main__":
    main()
