from sslaudio.cli import main

main()
