from cryocaps.cli.main import main

main()
