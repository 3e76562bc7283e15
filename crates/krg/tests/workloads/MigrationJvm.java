// A JVM at work: 4 threads add into a shared table of longs under a lock,
// 300 rounds each, 10 ms apart (about 3 s), while the garbage collector
// gets garbage to collect; then the main thread prints the table's sum and
// every 8th entry. The result does not depend on how the threads
// interleave, so a job moved while it runs must print what an unmoved one
// prints. Prints "ready" once every thread runs. Used by tests/migration.rs.
import java.util.concurrent.CountDownLatch;

public class MigrationJvm {
    static final int THREADS = 4;
    static final int ROUNDS = 300;
    static final long[] table = new long[64];

    public static void main(String[] args) throws Exception {
        CountDownLatch started = new CountDownLatch(THREADS);
        Thread[] workers = new Thread[THREADS];
        for (int t = 0; t < THREADS; t++) {
            final int id = t;
            workers[t] = new Thread(() -> {
                started.countDown();
                for (int round = 0; round < ROUNDS; round++) {
                    StringBuilder garbage = new StringBuilder();
                    for (int k = 0; k < 100; k++) {
                        garbage.append(k * round);
                    }
                    synchronized (table) {
                        table[(id * 7 + round) % table.length] += (long) (id + 1) * (round + 1)
                                + garbage.length();
                    }
                    try {
                        Thread.sleep(10);
                    } catch (InterruptedException e) {
                        return;
                    }
                }
            });
            workers[t].start();
        }
        started.await();
        System.out.println("ready");
        for (Thread w : workers) {
            w.join();
        }
        long sum = 0;
        for (long v : table) {
            sum += v;
        }
        System.out.println("sum " + sum);
        for (int i = 0; i < table.length; i += 8) {
            System.out.println("table[" + i + "] " + table[i]);
        }
    }
}
