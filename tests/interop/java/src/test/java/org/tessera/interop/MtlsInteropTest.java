package org.tessera.interop;

import io.spiffe.provider.SpiffeSslContextFactory;
import io.spiffe.provider.SpiffeSslContextFactory.SslContextOptions;
import io.spiffe.spiffeid.SpiffeId;
import io.spiffe.workloadapi.DefaultX509Source;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLException;
import javax.net.ssl.SSLServerSocket;
import javax.net.ssl.SSLSocket;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.OutputStreamWriter;
import java.io.PrintWriter;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.security.cert.Certificate;
import java.security.cert.X509Certificate;
import java.time.Duration;
import java.util.List;
import java.util.Set;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * Two workloads (each with its own X509Source on the agent) talk mutual TLS
 * using java-spiffe-provider's SpiffeKeyManager / SpiffeTrustManager; each side
 * accepts only the peer's SPIFFE ID.
 */
class MtlsInteropTest {
    private DefaultX509Source serverSource;
    private DefaultX509Source clientSource;

    @BeforeEach
    void open() throws Exception {
        serverSource = newSource();
        clientSource = newSource();
    }

    @AfterEach
    void close() {
        if (clientSource != null) {
            clientSource.close();
        }
        if (serverSource != null) {
            serverSource.close();
        }
    }

    private static DefaultX509Source newSource() throws Exception {
        return DefaultX509Source.newSource(DefaultX509Source.X509SourceOptions.builder()
                .spiffeSocketPath(Env.socket())
                .initTimeout(Duration.ofSeconds(10))
                .build());
    }

    private static SSLContext context(DefaultX509Source source, SpiffeId accepted) throws Exception {
        return SpiffeSslContextFactory.getSslContext(SslContextOptions.builder()
                .sslProtocol("TLSv1.3")
                .x509Source(source)
                .acceptedSpiffeIdsSupplier(() -> Set.of(accepted))
                .build());
    }

    private static String peerId(SSLSocket s) throws Exception {
        Certificate[] peer = s.getSession().getPeerCertificates();
        List<String> uris = WorkloadApiInteropTest.uriSans((X509Certificate) peer[0]);
        assertEquals(1, uris.size(), "peer URI SANs: " + uris);
        return uris.get(0);
    }

    /** Accepts one connection, reads a line, answers "pong <line> from <peer id>". */
    private static CompletableFuture<String> serveOnce(SSLServerSocket server) {
        return CompletableFuture.supplyAsync(() -> {
            try (SSLSocket s = (SSLSocket) server.accept()) {
                s.setSoTimeout(10_000);
                s.startHandshake();
                String peer = peerId(s);
                BufferedReader in = new BufferedReader(new InputStreamReader(s.getInputStream(), StandardCharsets.UTF_8));
                PrintWriter out = new PrintWriter(new OutputStreamWriter(s.getOutputStream(), StandardCharsets.UTF_8), true);
                String line = in.readLine();
                out.println("pong " + line + " from " + peer);
                return peer;
            } catch (Exception e) {
                throw new RuntimeException(e);
            }
        });
    }

    private static SSLServerSocket listen(SSLContext ctx) throws Exception {
        SSLServerSocket server = (SSLServerSocket) ctx.getServerSocketFactory()
                .createServerSocket(0, 1, InetAddress.getByName("127.0.0.1"));
        server.setNeedClientAuth(true);
        server.setSoTimeout(15_000);
        return server;
    }

    @Test
    @Timeout(60)
    void mutualTlsBetweenTwoWorkloads() throws Exception {
        SpiffeId id = Env.expectedId();
        assertEquals(id, serverSource.getX509Svid().getSpiffeId());
        assertEquals(id, clientSource.getX509Svid().getSpiffeId());

        try (SSLServerSocket server = listen(context(serverSource, id))) {
            CompletableFuture<String> served = serveOnce(server);

            SSLContext clientCtx = context(clientSource, id);
            try (SSLSocket s = (SSLSocket) clientCtx.getSocketFactory().createSocket()) {
                s.connect(new InetSocketAddress("127.0.0.1", server.getLocalPort()), 5_000);
                s.setSoTimeout(10_000);
                s.startHandshake();
                assertEquals("TLSv1.3", s.getSession().getProtocol());
                assertEquals(id.toString(), peerId(s), "server's SPIFFE ID as seen by the client");

                PrintWriter out = new PrintWriter(new OutputStreamWriter(s.getOutputStream(), StandardCharsets.UTF_8), true);
                BufferedReader in = new BufferedReader(new InputStreamReader(s.getInputStream(), StandardCharsets.UTF_8));
                out.println("ping");
                assertEquals("pong ping from " + id, in.readLine());
            }
            assertEquals(id.toString(), served.get(15, TimeUnit.SECONDS), "client's SPIFFE ID as seen by the server");
        }
    }

    @Test
    @Timeout(60)
    void clientRejectsServerWithUnexpectedSpiffeId() throws Exception {
        SpiffeId id = Env.expectedId();
        SpiffeId someoneElse = SpiffeId.parse("spiffe://" + Env.trustDomain().getName() + "/someone-else");

        try (SSLServerSocket server = listen(context(serverSource, id))) {
            CompletableFuture<String> served = serveOnce(server);

            SSLContext clientCtx = context(clientSource, someoneElse);
            try (SSLSocket s = (SSLSocket) clientCtx.getSocketFactory().createSocket()) {
                s.connect(new InetSocketAddress("127.0.0.1", server.getLocalPort()), 5_000);
                s.setSoTimeout(10_000);
                assertThrows(SSLException.class, s::startHandshake);
            }
            ExecutionException e = assertThrows(ExecutionException.class, () -> served.get(15, TimeUnit.SECONDS));
            assertTrue(e.getCause() instanceof RuntimeException);
            assertInstanceOf(java.io.IOException.class, e.getCause().getCause(), "server side: " + e.getCause());
        }
    }

    @Test
    @Timeout(60)
    void serverRejectsClientWithUnexpectedSpiffeId() throws Exception {
        SpiffeId id = Env.expectedId();
        SpiffeId someoneElse = SpiffeId.parse("spiffe://" + Env.trustDomain().getName() + "/someone-else");

        try (SSLServerSocket server = listen(context(serverSource, someoneElse))) {
            CompletableFuture<String> served = serveOnce(server);

            SSLContext clientCtx = context(clientSource, id);
            try (SSLSocket s = (SSLSocket) clientCtx.getSocketFactory().createSocket()) {
                s.connect(new InetSocketAddress("127.0.0.1", server.getLocalPort()), 5_000);
                s.setSoTimeout(10_000);
                // In TLS 1.3 the client may finish its side of the handshake before
                // the server has judged the client's certificate; the rejection then
                // shows up as an alert on the first read.
                assertThrows(java.io.IOException.class, () -> {
                    s.startHandshake();
                    PrintWriter out = new PrintWriter(new OutputStreamWriter(s.getOutputStream(), StandardCharsets.UTF_8), true);
                    out.println("ping");
                    String reply = new BufferedReader(new InputStreamReader(s.getInputStream(), StandardCharsets.UTF_8)).readLine();
                    if (reply == null) {
                        throw new java.io.EOFException("server closed the connection");
                    }
                });
            }
            ExecutionException e = assertThrows(ExecutionException.class, () -> served.get(15, TimeUnit.SECONDS));
            assertInstanceOf(SSLException.class, e.getCause().getCause(), "server side: " + e.getCause());
        }
    }
}
