from ringserve.frontend.process import main

main()
