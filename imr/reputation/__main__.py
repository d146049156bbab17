"""`python -m imr.reputation ...`: the imr command, sure to have the reputation commands.

imr/cli.py registers them with `register(main)`; this entry point works either
way (the bench uses it).
"""

from imr.cli import main
from imr.reputation.cli import register

if "reports" not in main.commands:
    register(main)

main()
