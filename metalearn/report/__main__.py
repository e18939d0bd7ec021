"""`python -m metalearn.report`: the `metalearn-report` command."""

from metalearn.report import main

if __name__ == "__main__":
    main()
