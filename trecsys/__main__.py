from trecsys.cli import main

main()
