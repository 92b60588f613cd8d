from asectl.cli import main

main()
