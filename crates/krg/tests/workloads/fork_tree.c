/* Spawns 16 children; child i prints "child i" and exits with status i.
 * The parent waits for them all and prints the sum of their statuses
 * (120). Used by tests/jobs.rs: the same output through `krg run` as
 * when run locally. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILDREN 16

int main(void) {
    int sum = 0;
    int i;

    for (i = 0; i < CHILDREN; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            printf("child %d\n", i);
            fflush(stdout);
            _exit(i);
        }
    }
    for (i = 0; i < CHILDREN; i++) {
        int status;
        if (wait(&status) < 0) {
            perror("wait");
            return 1;
        }
        if (!WIFEXITED(status)) {
            fprintf(stderr, "a child did not exit normally\n");
            return 1;
        }
        sum += WEXITSTATUS(status);
    }
    printf("sum %d\n", sum);
    return 0;
}
